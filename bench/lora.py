"""Step time and peak memory of LoRA (all linear layers) against full fine-tuning, same model and batch.

Each variant runs in its own process so that its peak resident memory is its own. Prints both
and the LoRA/full ratios. Example: python bench/lora.py --steps 5
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--variant", choices=["full", "lora"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_variant(args):
    """Train `args.steps` compiled steps of one variant; return its figures."""
    import numpy as np
    import mindspore as ms

    from mindsft.lora import LoraConfig, apply_lora, parameter_report
    from mindsft.models.llama import LlamaConfig, LlamaForCausalLM
    from mindsft.train.step import AdamWUpdate, TrainStep

    ms.set_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                         num_heads=args.heads, seq_length=args.seq, max_position_embeddings=args.seq)
    model = LlamaForCausalLM(config)
    if args.variant == "lora":
        apply_lora(model, LoraConfig.from_llamafactory({"lora_target": "all", "lora_rank": args.rank}))
    trainable, total, _ = parameter_report(model)
    # The trainer's own compiled step and optimizer, over the trainable parameters only.
    ms.set_context(mode=ms.GRAPH_MODE)
    params = model.trainable_params()
    step = TrainStep(model, params, AdamWUpdate(params, 0.9, 0.999, 1e-8, 0.0), max_grad_norm=1.0)
    rng = np.random.RandomState(0)
    batch = rng.randint(0, args.vocab, (args.batch, args.seq)).astype(np.int32)

    def train_step(input_ids, labels):
        return step.step([{"input_ids": input_ids, "labels": labels}], 1e-4, 1.0)[0]

    input_ids = labels = batch
    start = time.perf_counter()
    train_step(input_ids, labels)
    first_step = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        train_step(input_ids, labels)
    times, cpu_times = [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        train_step(input_ids, labels)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "variant": args.variant, "trainable": trainable, "total": total,
        "step_s": float(np.median(times)),
        "moments_mib": 2 * 4 * trainable / 2 ** 20,
        # CPU seconds (all threads) per step: steadier than wall time on a shared machine.
        "step_cpu_s": float(np.median(cpu_times)), "first_step_s": first_step,
        "tokens_per_s": args.batch * args.seq / float(np.median(times)),
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def main(argv=None):
    args = parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return 0
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    env = {**os.environ, "GLOG_v": "3"}
    results = {}
    for variant in ("full", "lora"):
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--variant", variant],
                              capture_output=True, text=True, env=env)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{variant} run failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[variant] = json.loads(lines[-1][len("RESULT "):])
    full, lora = results["full"], results["lora"]
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; batch {args.batch} x seq "
          f"{args.seq}; LoRA rank {args.rank} on all linear layers; median of {args.steps} compiled steps")
    print(f"{'':24s}{'full':>14s}{'lora':>14s}{'lora/full':>12s}")
    rows = [("trainable params", "trainable", "{:,d}"), ("all params", "total", "{:,d}"),
            ("step time (s)", "step_s", "{:.3f}"),
            ("step CPU time (s)", "step_cpu_s", "{:.3f}"), ("tokens/s", "tokens_per_s", "{:.0f}"),
            ("Adam moments (MiB)", "moments_mib", "{:.1f}"),
            ("first step, compile (s)", "first_step_s", "{:.1f}"), ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}")]
    for label, key, fmt in rows:
        ratio = lora[key] / full[key] if full[key] else float("nan")
        print(f"{label:24s}{fmt.format(full[key]):>14s}{fmt.format(lora[key]):>14s}{ratio:>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
