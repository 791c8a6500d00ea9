"""Benchmark: streaming HF → MindSpore conversion against a load-everything conversion in the
MindFormers manner and a plain copy of the same bytes.

Generates a random Llama in HuggingFace format (TinyLlama-1.1B shapes by default: 2.2 GB in
bf16, two safetensors shards), then runs each method in its own process and prints wall time
and peak RSS side by side, with ratios. Goals: our peak RSS ≤ largest tensor + 0.5 GB, our wall
time ≤ 2 × the plain copy.

    python bench/convert.py [--layers 22] [--workdir /tmp/mindsft-bench-convert] [--keep]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mindsft.convert import dtypes  # noqa: E402
from mindsft.convert.safetensors_format import write_safetensors  # noqa: E402
from mindsft.models.families import family_of, model_config_from_hf  # noqa: E402


def hf_config(layers):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
            "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": layers,
            "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": False}


def generate(folder, config):
    """Write a random bf16 Llama as two safetensors shards + index, streaming (no whole tensor in RAM)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    pool = dtypes.convert((0.02 * rng.standard_normal(4 * 2**20)).astype(np.float32), "float32", "bfloat16")
    model_config = model_config_from_hf(config)
    family = family_of(model_config)
    shapes = {e.hf_name: e.hf_shape for e in family.weight_entries(model_config)}
    names = list(shapes)
    halves = [names[:len(names) // 2], names[len(names) // 2:]]

    def blocks(numel, seed):
        start = seed % len(pool)
        while numel:
            count = min(numel, len(pool) - start)
            yield pool[start:start + count]
            numel -= count
            start = 0

    weight_map = {}
    for index, part in enumerate(halves, 1):
        file_name = f"model-{index:05d}-of-00002.safetensors"
        entries = [(n, "bfloat16", shapes[n], blocks(int(np.prod(shapes[n])), i * 7919)) for i, n in enumerate(part)]
        write_safetensors(os.path.join(folder, file_name), entries)
        weight_map.update({n: file_name for n in part})
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    largest = max(int(np.prod(s)) * 2 for s in shapes.values())
    return total, largest


def run_ours(hf_dir, out):
    from mindsft.convert import hf_to_ms
    hf_to_ms(hf_dir, out, progress=False)


def run_load_everything(hf_dir, out):
    """MindFormers' way: every tensor into memory through torch, convert, save_checkpoint once."""
    import torch
    import mindspore as ms
    from safetensors.torch import load_file

    with open(os.path.join(hf_dir, "config.json")) as f:
        model_config = model_config_from_hf(json.load(f))
        family = family_of(model_config)
    ms_name = {e.hf_name: e.ms_names[0] for e in family.weight_entries(model_config)}
    state = {}
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(hf_dir, name)))
    converted = []
    for name, tensor in state.items():
        # as MindFormers' pt2ms: through float32 numpy, back to the source dtype in MindSpore
        value = ms.Tensor(tensor.to(torch.float32).numpy(), dtype=ms.bfloat16)
        converted.append({"name": ms_name[name], "data": value})
    ms.save_checkpoint(converted, out)


def run_copy(hf_dir, out):
    os.makedirs(out)
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(out, name))


METHODS = {"ours (streaming)": run_ours, "load-everything (MindFormers manner)": run_load_everything,
           "plain copy": run_copy}


def peak_rss_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def measure(method, hf_dir, out):
    """Run one method in a fresh process; (wall seconds, peak RSS bytes)."""
    env = dict(os.environ, GLOG_v="3")
    result = subprocess.run([sys.executable, __file__, "--run", method, "--hf_dir", hf_dir, "--out", out],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode:
        sys.exit(f"{method} failed:\n{result.stderr[-3000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return figures["seconds"], figures["peak_rss_bytes"]


def same_tensors(ckpt_a, ckpt_b):
    from mindsft.convert.ckpt_format import read_ckpt
    a, _ = read_ckpt(ckpt_a)
    b, _ = read_ckpt(ckpt_b)
    if set(a) != set(b):
        return False
    for name, tensor in a.items():
        if tensor.dtype != b[name].dtype or tensor.shape != b[name].shape:
            return False
        for block_a, block_b in zip(tensor.blocks(), b[name].blocks()):
            if not np.array_equal(block_a, block_b):
                return False
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (22: 1.1B parameters, 2.2 GB bf16)")
    parser.add_argument("--workdir", default=None, help="where to write (default: a new folder under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the generated model and outputs")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--hf_dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        started = time.time()
        METHODS[args.run](args.hf_dir, args.out)
        print(json.dumps({"seconds": time.time() - started, "peak_rss_bytes": peak_rss_bytes()}))
        return

    workdir = args.workdir or tempfile.mkdtemp(prefix="mindsft-bench-convert-")
    hf_dir = os.path.join(workdir, "hf")
    started = time.time()
    total, largest = generate(hf_dir, hf_config(args.layers))
    print(f"model: {args.layers} layers, {total / 2**30:.2f} GiB bf16 in 2 shards, largest tensor "
          f"{largest / 2**20:.0f} MiB (generated in {time.time() - started:.0f} s)")
    subprocess.run(f"cat {hf_dir}/*.safetensors > /dev/null", shell=True, check=True)  # same page cache for all

    outputs = {"ours (streaming)": os.path.join(workdir, "ours.ckpt"),
               "load-everything (MindFormers manner)": os.path.join(workdir, "mf.ckpt"),
               "plain copy": os.path.join(workdir, "copy")}
    results = {}
    for method, out in outputs.items():
        results[method] = measure(method, hf_dir, out)
        print(f"  ran {method}: {results[method][0]:.1f} s", flush=True)
    identical = same_tensors(outputs["ours (streaming)"], outputs["load-everything (MindFormers manner)"])

    copy_seconds = results["plain copy"][0]
    ours_rss = results["ours (streaming)"][1]
    print(f"\n{'method':40s} {'wall s':>8s} {'× copy':>7s} {'peak RSS MiB':>13s} {'× ours':>7s}")
    for method, (seconds, rss) in results.items():
        print(f"{method:40s} {seconds:8.1f} {seconds / copy_seconds:7.2f} {rss / 2**20:13.0f} {rss / ours_rss:7.2f}")
    ours_seconds = results["ours (streaming)"][0]
    print(f"\nours and load-everything wrote identical tensors: {identical}")
    print(f"goal peak RSS ≤ largest tensor + 0.5 GiB = {(largest + 2**29) / 2**20:.0f} MiB: "
          f"{'met' if ours_rss <= largest + 2**29 else 'MISSED'} ({ours_rss / 2**20:.0f} MiB)")
    print(f"goal wall ≤ 2 × plain copy = {2 * copy_seconds:.1f} s: "
          f"{'met' if ours_seconds <= 2 * copy_seconds else 'MISSED'} ({ours_seconds:.1f} s)")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
