"""QLoRA against LoRA on a float32 base: peak memory while loading and while training, step time.

A model of TinyLlama-1.1B's shapes (random weights, written by this script as a sharded
HuggingFace folder), LoRA rank 8 on all linear layers, batch 1 x 512, three bases side by side:
float32, 8-bit (LLM.int8 rows) and 4-bit NF4 with double quantization. Each runs in its own
process so that its peak resident memory is its own. The float32 base is loaded tensor by tensor
into the built model (the fairest float32 loader: the model plus one tensor).

Example: python bench/qlora.py --layers 22 --steps 2    (--layers 4 for a quick look)
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import bench_env, print_result, ratio, read_result, run_measured  # noqa: E402

VARIANTS = ("fp32", "int8", "nf4")
# TinyLlama-1.1B (TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json).
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (TinyLlama has 22)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the first (compiling) one")
    parser.add_argument("--workdir", help="where the random model is written (default: a temporary folder)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--recompute", action="store_true",
                        help="recompute each decoder layer in the backward pass (recompute_config.recompute)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def hf_config(layers):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "num_hidden_layers": layers, "tie_word_embeddings": False, "torch_dtype": "float32",
            "bos_token_id": 1, "eos_token_id": 2, **TINYLLAMA}


def write_random_model(folder, layers, seed=0):
    """A sharded float32 HuggingFace folder (one shard per layer), written one shard at a time."""
    import numpy as np
    from safetensors.numpy import save_file
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    rng = np.random.default_rng(seed)
    hidden, inter = TINYLLAMA["hidden_size"], TINYLLAMA["intermediate_size"]
    kv = hidden // TINYLLAMA["num_attention_heads"] * TINYLLAMA["num_key_value_heads"]

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    shards = [{"model.embed_tokens.weight": normal(TINYLLAMA["vocab_size"], hidden),
               "model.norm.weight": np.ones(hidden, np.float32),
               "lm_head.weight": normal(TINYLLAMA["vocab_size"], hidden)}]
    weight_map = {}
    for index in range(layers + 1):
        if index:
            prefix = f"model.layers.{index - 1}."
            tensors = {prefix + "self_attn.q_proj.weight": normal(hidden, hidden),
                       prefix + "self_attn.k_proj.weight": normal(kv, hidden),
                       prefix + "self_attn.v_proj.weight": normal(kv, hidden),
                       prefix + "self_attn.o_proj.weight": normal(hidden, hidden),
                       prefix + "mlp.gate_proj.weight": normal(inter, hidden),
                       prefix + "mlp.up_proj.weight": normal(inter, hidden),
                       prefix + "mlp.down_proj.weight": normal(hidden, inter),
                       prefix + "input_layernorm.weight": np.ones(hidden, np.float32),
                       prefix + "post_attention_layernorm.weight": np.ones(hidden, np.float32)}
        else:
            tensors = shards[0]
        name = f"model-{index:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        del tensors
    shards.clear()
    with open(folder / "config.json", "w") as f:
        json.dump(hf_config(layers), f, indent=2)
    with open(folder / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    return folder


def peak_rss_mib():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) / 1024


def load_float32(config, model_dir):
    """The float32 model built, then each tensor streamed into it (model + one tensor at the peak)."""
    import mindspore as ms
    from mindsft.weights import float32, open_base_weights
    from mindsft.models.llama import LlamaForCausalLM
    model = LlamaForCausalLM(config)
    tensors, _, _ = open_base_weights(model_dir)
    for param in model.get_parameters():
        param.set_data(ms.Tensor(float32(tensors[param.name])))
    return model


def run_variant(args):
    import numpy as np
    import mindspore as ms
    from mindsft.lora import LoraConfig, apply_lora
    from mindsft.models.families import model_config_from_hf
    from mindsft.quantized_base import Quantization, build_quantized_llama
    from mindsft.train.step import AdamWUpdate, TrainStep

    # 22 layers x 7 adapters: the step's loops over 308 gradients pass MindSpore's default call depth (1000).
    ms.set_context(mode=ms.GRAPH_MODE, max_call_depth=10000)
    ms.set_device("CPU")
    ms.set_seed(0)
    with open(Path(args.model_dir) / "config.json") as f:
        config = model_config_from_hf(json.load(f))
    config.seq_length = args.seq
    baseline = peak_rss_mib()
    started = time.perf_counter()
    if args.variant == "fp32":
        model = load_float32(config, args.model_dir)
    else:
        quantization = Quantization(8) if args.variant == "int8" else Quantization(4, "nf4", True)
        model, report = build_quantized_llama(config, args.model_dir, quantization)
        print(report, flush=True)
    load_s = time.perf_counter() - started
    load_peak = peak_rss_mib()
    base_mib = sum(p.size * p.itemsize for p in model.get_parameters()) / 2**20
    apply_lora(model, LoraConfig.from_llamafactory({"lora_target": "all", "lora_rank": args.rank}))
    if args.recompute:
        model.recompute_layers()
    params = model.trainable_params()
    step = TrainStep(model, params, AdamWUpdate(params, 0.9, 0.999, 1e-8, 0.0), max_grad_norm=1.0)
    rng = np.random.RandomState(0)
    input_ids = rng.randint(0, config.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    started = time.perf_counter()
    step.step([{"input_ids": input_ids, "labels": input_ids}], 1e-4, 1.0)
    first_s = time.perf_counter() - started
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss = step.step([{"input_ids": input_ids, "labels": input_ids}], 1e-4, 1.0)[0]
        times.append(time.perf_counter() - started)
    return {"variant": args.variant, "base_mib": base_mib, "baseline_rss_mib": baseline, "load_s": load_s,
            "load_peak_mib": load_peak, "train_peak_mib": peak_rss_mib(), "first_step_s": first_s,
            "step_s": float(np.median(times)) if times else float("nan"), "loss": float(loss) if times else None,
            "trainable": sum(int(p.size) for p in params)}


def main(argv=None):
    args = parse_args(argv)
    if args.variant:
        print_result(run_variant(args))
        return 0
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as scratch:
        workdir = Path(args.workdir or scratch)
        started = time.perf_counter()
        model_dir = write_random_model(workdir / f"tinyllama-{args.layers}l", args.layers)
        print(f"random TinyLlama-shaped model ({args.layers} layers) written in {time.perf_counter() - started:.0f} s "
              f"to {model_dir}", flush=True)
        results = {}
        for variant in args.variants.split(","):
            command = [sys.executable, __file__, "--variant", variant, "--model_dir", str(model_dir),
                       "--layers", str(args.layers), "--seq", str(args.seq), "--batch", str(args.batch),
                       "--rank", str(args.rank), "--steps", str(args.steps)] + (["--recompute"] if args.recompute else [])
            code, output, peak, seconds = run_measured(command, workdir / f"{variant}.log", env=bench_env(),
                                                       timeout=3600)
            result = read_result(output)
            if code or result is None:
                print(f"{variant} failed ({code}):\n{output[-3000:]}", file=sys.stderr)
                return 1
            result["process_peak_mib"] = peak
            results[variant] = result
            print(f"{variant}: {json.dumps(result)} ({seconds:.0f} s)", flush=True)
    print(f"\nTinyLlama-1.1B shapes, {args.layers} of 22 layers; LoRA rank {args.rank} on all linear layers; "
          f"batch {args.batch} x {args.seq}; median of {args.steps} compiled steps after the first"
          + ("; every decoder layer recomputed" if args.recompute else ""))
    names = [v for v in VARIANTS if v in results]
    print(f"{'':28s}" + "".join(f"{v:>12s}" for v in names) + "".join(f"{v + '/fp32':>12s}" for v in names[1:]))
    rows = [("base weights (MiB)", "base_mib", "{:.0f}"), ("load time (s)", "load_s", "{:.1f}"),
            ("peak RSS loading (MiB)", "load_peak_mib", "{:.0f}"),
            ("peak RSS training (MiB)", "train_peak_mib", "{:.0f}"),
            ("first step, compile (s)", "first_step_s", "{:.1f}"), ("step time (s)", "step_s", "{:.2f}")]
    for label, key, fmt in rows:
        line = f"{label:28s}" + "".join(f"{fmt.format(results[v][key]):>12s}" for v in names)
        if "fp32" in results:
            line += "".join(f"{ratio(results[v][key], results['fp32'][key]):>12.3f}" for v in names[1:])
        print(line)
    if "fp32" in results and "nf4" in results:
        memory = ratio(results["nf4"]["train_peak_mib"], results["fp32"]["train_peak_mib"])
        speed = ratio(results["nf4"]["step_s"], results["fp32"]["step_s"])
        # With every layer recomputed the goal is 0.4x (issue: real shapes), else 0.3x.
        goal = 0.4 if args.recompute else 0.3
        print(f"goals: 4-bit training peak RSS <= {goal}x fp32: {memory:.3f} ({'met' if memory <= goal else 'not met'}); "
              f"4-bit step time <= 1.5x fp32: {speed:.3f} ({'met' if speed <= 1.5 else 'not met'})")
        # The ratio a step that held nothing but the weights would reach: the process before
        # loading plus the base, each side (the fp32 embedding and head stay in both).
        floor = ratio(results["nf4"]["baseline_rss_mib"] + results["nf4"]["base_mib"],
                      results["fp32"]["baseline_rss_mib"] + results["fp32"]["base_mib"])
        print(f"floor of that ratio (process before loading + base weights, no training memory): {floor:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
