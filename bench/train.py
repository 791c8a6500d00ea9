"""Tokens/s of a real mindsft fine-tuning run against a transformers + torch eager loop, and of
1 worker against 2 msrun workers, on the tiny CPU config's Llama.

The same random start weights and the same MindRecord records (random tokens, a prompt part
labelled -100, pad at the end) feed three runs, one after the other:
  1. run_mindformer.py, 1 worker (finetune, configs/llama2/finetune_llama_tiny_cpu.yaml);
  2. run_mindformer.py under msrun, 2 workers (data parallel, global batch doubled);
  3. transformers' LlamaForCausalLM, torch eager, AdamW + clip 1.0, batch as run 1.
mindsft's tokens/s come from the run's metrics.jsonl (the first, compiling step left out);
torch's from the same count of tokens over its step times (its first step left out too).

    python bench/train.py                 # ~4-6 minutes on 2 busy cores
    python bench/train.py --records 32    # shorter
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (ROOT, bench_env, print_result, ratio, read_result, run_measured,  # noqa: E402
                           self_peak_rss_mib, set_torch_threads)

TINY_YAML = ROOT / "configs" / "llama2" / "finetune_llama_tiny_cpu.yaml"
# From the issue: MindFormers 2.0.0 fine-tuning a tiny Llama on this kind of CPU machine.
MINDFORMERS_TOKENS_PER_S = 880.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(TINY_YAML), help="run_mindformer YAML (default: the tiny CPU one)")
    parser.add_argument("--records", type=int, default=512, help="records in the dataset (one epoch is run)")
    parser.add_argument("--skip_msrun", action="store_true", help="leave out the 2-worker run")
    parser.add_argument("--torch_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work_dir", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def read_settings(config_path):
    """(LlamaConfig, batch_size) of the YAML's model and runner."""
    from mindsft.config import load_run_config
    config = load_run_config(config_path)
    return config.model_config, config.runner_config.batch_size


def random_records(config, count, seed=0):
    """qa records of seq_length+1 tokens: BOS, a prompt (labels -100), an answer, then pad 0."""
    import numpy as np
    rng = np.random.default_rng(seed)
    length = config.seq_length + 1
    input_ids = np.zeros((count, length), np.int32)
    labels = np.full((count, length), -100, np.int32)
    for row in range(count):
        used = int(rng.integers(length // 2, length + 1))
        prompt = int(rng.integers(1, used // 2 + 1))
        input_ids[row, :used] = rng.integers(3, config.vocab_size, used)
        input_ids[row, 0] = config.bos_token_id
        labels[row, prompt:used] = input_ids[row, prompt:used]
    return input_ids, labels


def prepare(work_dir, config, records):
    """Start checkpoint (.ckpt and .npz of HF names), MindRecord shards and the same records as .npz."""
    import numpy as np
    import mindspore as ms
    from mindsft.models.families import hf_to_ms_arrays
    from mindsft.data.mindrecord import write_mindrecord
    from mindsft.demo_model import random_llama_arrays

    arrays = random_llama_arrays(config, seed=0)
    np.savez(os.path.join(work_dir, "start.npz"), **arrays)
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in hf_to_ms_arrays(arrays, config).items()],
                       os.path.join(work_dir, "start.ckpt"))
    input_ids, labels = random_records(config, records)
    np.savez(os.path.join(work_dir, "records.npz"), input_ids=input_ids, labels=labels)
    data_dir = os.path.join(work_dir, "data")
    write_mindrecord(({"input_ids": i, "labels": l} for i, l in zip(input_ids, labels)),
                     os.path.join(data_dir, "train.mindrecord"), "qa", partitions=2)
    return sum(int(a.size) for a in arrays.values()), data_dir


def throughput(tokens_per_step, step_seconds):
    """Figures of a run from its per-step tokens and seconds; the first (compiling) step is left out.

    tokens/s is total tokens over total time; the median step is also given because one step
    slowed by another job on the shared cores can move the total a lot in a short run.
    """
    import numpy as np
    timed_tokens, timed_seconds = tokens_per_step[1:], step_seconds[1:]
    return {"tokens_per_s": sum(timed_tokens) / sum(timed_seconds),
            "median_tokens_per_s": float(np.median(np.asarray(timed_tokens) / np.asarray(timed_seconds))),
            "steps_timed": len(timed_seconds), "first_step_s": step_seconds[0]}


def metrics_throughput(metrics_path):
    """throughput() of a run's metrics.jsonl."""
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "tokens" in r]
    return throughput([r["tokens"] for r in rows], [r["step_time_s"] for r in rows])


def run_mindsft(args, work_dir, data_dir, workers):
    """One run_mindformer.py fine-tuning run; returns its figures."""
    from tests.trainkit import free_port  # a free TCP port for msrun's scheduler
    out = os.path.join(work_dir, f"out_{workers}w")
    run_args = [str(ROOT / "run_mindformer.py"), "--config", args.config, "--run_mode", "finetune",
                "--output_dir", out, "--train_dataset_dir", data_dir,
                "--load_checkpoint", os.path.join(work_dir, "start.ckpt"), "--epochs", "1"]
    if workers == 1:
        command = [sys.executable, *run_args, "--use_parallel", "False"]
    else:
        command = ["msrun", f"--worker_num={workers}", f"--local_worker_num={workers}",
                   f"--master_port={free_port()}", f"--log_dir={os.path.join(out, 'msrun_log')}", "--join=True",
                   "--cluster_time_out=300", *run_args, "--use_parallel", "True",
                   "--parallel_config.data_parallel", str(workers)]
    code, output, peak, wall = run_measured(command, os.path.join(work_dir, f"mindsft_{workers}w.log"))
    metrics = os.path.join(out, "metrics.jsonl")
    if code or not os.path.isfile(metrics):
        logs = output[-3000:]
        log_dir = os.path.join(out, "msrun_log")
        if os.path.isdir(log_dir):
            logs += "".join(open(os.path.join(log_dir, n), errors="replace").read()[-2000:]
                            for n in sorted(os.listdir(log_dir)))
        raise RuntimeError(f"mindsft run with {workers} worker(s) failed (exit {code}):\n{logs}")
    return dict(metrics_throughput(metrics), peak_rss_mib=peak, wall_s=wall)


def torch_worker(args):
    """The reference loop: transformers LlamaForCausalLM, torch eager, AdamW, clip 1.0, one epoch."""
    import numpy as np
    import torch
    import transformers

    threads = set_torch_threads(args.threads)
    from mindsft.models.families import hf_config_of
    config, _ = read_settings(args.config)
    hf_config = transformers.LlamaConfig(**{k: v for k, v in hf_config_of(config).items()
                                            if k not in ("architectures", "torch_dtype")})
    model = transformers.LlamaForCausalLM(hf_config)
    with np.load(os.path.join(args.work_dir, "start.npz")) as arrays:
        model.load_state_dict({k: torch.from_numpy(arrays[k]) for k in arrays.files}, strict=False)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    with np.load(os.path.join(args.work_dir, "records.npz")) as records:
        input_ids, labels = records["input_ids"].astype(np.int64), records["labels"].astype(np.int64)
    # As mindsft's reader: pad (id 0) is never learned; the model takes all seq_length+1 tokens.
    labels[input_ids == config.pad_token_id] = -100
    order = np.random.default_rng([0, 0]).permutation(len(input_ids))
    steps = len(order) // args.batch
    times = []
    for step in range(steps):
        rows = order[step * args.batch:(step + 1) * args.batch]
        start = time.perf_counter()
        loss = model(input_ids=torch.from_numpy(input_ids[rows]), labels=torch.from_numpy(labels[rows])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    tokens = args.batch * config.seq_length
    print_result(dict(throughput([tokens] * steps, times), threads=threads, peak_rss_mib_self=self_peak_rss_mib()))


def run_torch(args, work_dir, batch):
    command = [sys.executable, os.path.abspath(__file__), "--torch_worker", "--config", args.config,
               "--work_dir", work_dir, "--batch", str(batch), "--threads", str(args.threads)]
    code, output, peak, wall = run_measured(command, os.path.join(work_dir, "torch.log"))
    result = read_result(output)
    if code or result is None:
        raise RuntimeError(f"torch loop failed (exit {code}):\n{output[-3000:]}")
    return dict(result, peak_rss_mib=peak, wall_s=wall)


def main(argv=None):
    args = parse_args(argv)
    if args.torch_worker:
        torch_worker(args)
        return 0
    config, batch = read_settings(args.config)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as work_dir:
        params, data_dir = prepare(work_dir, config, args.records)
        try:
            results["mindsft, 1 worker"] = run_mindsft(args, work_dir, data_dir, 1)
            if not args.skip_msrun:
                results["mindsft, 2 workers"] = run_mindsft(args, work_dir, data_dir, 2)
            results["torch eager"] = run_torch(args, work_dir, batch)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1

    print(f"model: {args.config} ({os.path.basename(args.config)}): Llama hidden {config.hidden_size}, "
          f"{config.num_layers} layers, {config.num_heads} heads ({config.n_kv_heads} kv), intermediate "
          f"{config.intermediate_size}, vocab {config.vocab_size}, seq {config.seq_length}: {params / 1e6:.3f}M params")
    print(f"data: {args.records} random qa records in 2 MindRecord shards, one epoch; batch {batch} per worker; "
          f"fp32; {os.cpu_count()} CPU cores; torch threads {results['torch eager']['threads']}")
    print(f"{'run':22s}{'tokens/s':>10s}{'median step tok/s':>19s}{'steps timed':>13s}{'first step (s)':>16s}"
          f"{'process wall (s)':>18s}{'peak RSS (MiB)':>16s}")
    for name, r in results.items():
        print(f"{name:22s}{r['tokens_per_s']:>10.0f}{r['median_tokens_per_s']:>19.0f}{r['steps_timed']:>13d}"
              f"{r['first_step_s']:>16.2f}{r['wall_s']:>18.1f}{r['peak_rss_mib']:>16.0f}")
    one = results["mindsft, 1 worker"]
    torch_run = results["torch eager"]
    pairs = [("mindsft 1 worker / torch eager", one, torch_run)]
    if "mindsft, 2 workers" in results:
        two = results["mindsft, 2 workers"]
        pairs += [("mindsft 2 workers / 1 worker", two, one), ("mindsft 2 workers / torch eager", two, torch_run)]
    print(f"{'ratio of tokens/s':34s}{'total':>8s}{'median step':>13s}")
    for label, a, b in pairs:
        print(f"{label:34s}{ratio(a['tokens_per_s'], b['tokens_per_s']):>8.3f}"
              f"{ratio(a['median_tokens_per_s'], b['median_tokens_per_s']):>13.3f}")
    one = one["tokens_per_s"]
    print(f"reference: MindFormers 2.0.0 measured ~{MINDFORMERS_TOKENS_PER_S:.0f} tokens/s on CPU with a tiny Llama "
          f"(issue); mindsft 1 worker / MindFormers = {ratio(one, MINDFORMERS_TOKENS_PER_S):.2f} "
          f"(same tiny-config model size assumed, different machine load)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
