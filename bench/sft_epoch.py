"""One SFT epoch over the same alpaca samples, five ways: mindsft fixed-length rows, bucketed
batches and packed rows; transformers + torch eager padding each batch to its longest sample, and
with LLaMA-Factory's neat_packing (block-diagonal 4-D mask, positions restarting per sample, sdpa).

The ~20M-parameter bench Llama (hidden 256, 4 layers, 8 heads, vocab 32000), fp32, seq_length
2048, AdamW + clipping at 1.0, the same weights everywhere. The samples are every `--every`-th
record of ../shared/data/alpaca/alpaca_en_demo.json (Llama 2 tokenizer, vicuna_v1.1 template),
records 0, 10, 20, ..., 990 by default, then at most `--samples` of them; in file order (no
shuffle), `--batch` rows per step. Each run is its own process, one after the other, so each peak
RSS is its own and the runs never share the cores.

Why every 10th record (100 samples) and no longer the first 32: a tenth of the file taken across
all of it has the file's lengths (mean 269 tokens against 271, median 228 against 226, longest
836, the file's longest), where the first 32 are longer (mean 290); and it packs into 14 rows, 7
steps, where the first 32 made 5 rows, so 3 steps: the third held one row and one empty padding
row, and the packed run's steady step was the median of 2 steps, which on shared cores moved by
30%. The fixed-length run stays near 3 minutes on 2 cores. All five runs read the same subset, in
the same order. `--every 1 --samples 32` is the old subset.

Printed per run: epoch wall time (including mindsft's compiling of the step once per shape),
compile (the first step of each shape above that shape's median step), the steady step (median
step time), learned tokens/s over wall - compile (same learned tokens in every run), padding
fraction (computed positions that hold no sample token), peak RSS, and the ratios against run 1,
run 4 and run 5. Packed against fixed rows is also shown on the whole wall (compiling included)
and split into its two factors: fewer steps, and a cheaper step.

    python bench/sft_epoch.py                                  # every 10th record, batch 2 (~7 min)
    python bench/sft_epoch.py --runs fixed,packed              # the 8x goal alone (~4 min)
    python bench/sft_epoch.py --every 1 --samples 999 --batch 4  # the whole file
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (bench_env, mindspore_threads, print_result, ratio, read_result,  # noqa: E402
                           run_measured, self_peak_rss_mib, set_torch_threads)

RUNS = {"fixed": "mindsft, fixed-length rows", "bucketed": "mindsft, bucketed batches",
        "packed": "mindsft, packed rows", "torch_pad": "transformers+torch, pad to longest",
        "torch_neat": "transformers+torch, neat_packing"}
GOALS = [("packed", "fixed", 8.0), ("packed", "torch_pad", 1.5), ("packed", "torch_neat", 1.2)]
IGNORE = -100


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=10, help="take every N-th alpaca record (default 10: 100 "
                        "samples spread over the whole file; the fixed-length run then takes ~3 minutes on 2 cores)")
    parser.add_argument("--samples", type=int, help="at most this many of those records (default: all)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--bucket", type=int, default=128, help="pad_to_multiple_of of the bucketed run")
    parser.add_argument("--runs", default=",".join(RUNS), help="which runs, comma-separated")
    parser.add_argument("--shared", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                         "..", "shared", "data"))
    parser.add_argument("--run", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def llama_config(args):
    from mindsft.models.config import LlamaConfig
    return LlamaConfig(vocab_size=32000, hidden_size=256, num_layers=4, num_heads=8, seq_length=args.seq,
                       max_position_embeddings=args.seq)


# ---------------------------------------------------------------------------- data

def prepare_data(args, folder):
    """The subset as alpaca conversations, tokenized twice: padded rows and packed rows."""
    import json
    from mindsft.data.alpaca import convert_alpaca
    from mindsft.data.preprocess import PreprocessOptions, preprocess
    alpaca = os.path.join(args.shared, "alpaca", "alpaca_en_demo.json")
    model_file = os.path.join(args.shared, "tokenizers", "llama2", "tokenizer.model")
    for path in (alpaca, model_file):
        if not os.path.exists(path):
            raise SystemExit(f"{path} is absent: this benchmark needs ../shared/data")
    with open(alpaca, encoding="utf-8") as f:
        records = json.load(f)[::args.every][:args.samples]
    subset = os.path.join(folder, "subset.json")
    with open(subset, "w", encoding="utf-8") as f:
        json.dump(records, f)
    convert_alpaca(subset, os.path.join(folder, "conv.json"))
    stats = {}
    for name, packing in (("plain", False), ("packed", True)):
        options = PreprocessOptions(input_glob=os.path.join(folder, "conv.json"), model_file=model_file,
                                    output_file=os.path.join(folder, name, "train.mindrecord"),
                                    seq_length=args.seq, packing=packing, progress=False, command_line=["bench"])
        stats[name] = preprocess(options)
    return stats


def batches(args, run):
    """Micro-batches (dicts of columns) of the whole epoch, in file order, as the trainer reads them."""
    from mindsft.train.batches import ShardedBatches
    data = os.path.join(args.data, "packed" if run in ("packed", "torch_neat") else "plain")
    reader = ShardedBatches(data, args.seq, args.batch, shuffle=False, drop_remainder=False,
                            pad_to_multiple_of=args.bucket if run == "bucketed" else 0)
    return [micro[0] for micro in reader.epoch(0)]


def sample_tokens(batch):
    """Positions of a batch that hold a sample token: Llama 2's pad id 0 is <unk>, which these
    samples never contain, so everything else is padding (packed or not)."""
    import numpy as np
    return int(np.count_nonzero(batch["input_ids"]))


def learned_tokens(batch):
    import numpy as np
    labels = batch["labels"][:, 1:]
    if "actual_seq_len" in batch:
        from mindsft.data.packing import sample_ids
        same = sample_ids(batch["actual_seq_len"], batch["labels"].shape[1])
        labels = np.where(same[:, 1:] == same[:, :-1], labels, IGNORE)
    return int(np.count_nonzero(labels != IGNORE))


# ---------------------------------------------------------------------------- the runs

def run_mindsft(args, micro_batches):
    """The trainer's own TrainStep (graph mode, fused CPU kernels) over the epoch's batches."""
    import numpy as np
    import mindspore as ms
    from mindsft.loading import assign_weights
    from mindsft.models.families import hf_to_ms_arrays
    from mindsft.models.llama import LlamaForCausalLM
    from mindsft.train.step import AdamWUpdate, TrainStep

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    threads = mindspore_threads()
    config = llama_config(args)
    model = LlamaForCausalLM(config)
    with np.load(args.weights) as arrays:
        assign_weights(model, hf_to_ms_arrays({k: arrays[k] for k in arrays.files}, config), source=args.weights)
    params = model.trainable_params()
    train_step = TrainStep(model, params, AdamWUpdate(params, 0.9, 0.999, 1e-8, 0.0), max_grad_norm=1.0)
    times, losses = [], []
    started = time.perf_counter()
    for batch in micro_batches:
        step_start = time.perf_counter()
        losses.append(train_step.step([batch], 1e-4, 1.0)[0])
        times.append(time.perf_counter() - step_start)
    wall = time.perf_counter() - started
    return {"threads": threads, "wall_s": wall, "compile_s": compile_excess(micro_batches, times),
            "shapes": len({b["input_ids"].shape for b in micro_batches}), "first_loss": losses[0],
            "step_s": steady_step(micro_batches, times)}


def steady_step(micro_batches, times):
    """Median step time, leaving out the first step of each shape (where compiling happens)."""
    import numpy as np
    seen, steady = set(), []
    for batch, seconds in zip(micro_batches, times):
        shape = batch["input_ids"].shape
        if shape in seen:
            steady.append(seconds)
        seen.add(shape)
    return float(np.median(steady or times))


def compile_excess(micro_batches, times):
    """Seconds the first step of each shape took above that shape's median step (its compile)."""
    import numpy as np
    by_shape = {}
    for batch, seconds in zip(micro_batches, times):
        by_shape.setdefault(batch["input_ids"].shape, []).append(seconds)
    excess = 0.0
    for seconds in by_shape.values():
        rest = seconds[1:] or [min(times)]
        excess += max(0.0, seconds[0] - float(np.median(rest)))
    return excess


def run_torch(args, micro_batches, neat):
    """transformers' LlamaForCausalLM, eager, torch.optim.AdamW, clip 1.0. Without neat: each batch
    cut to its longest sample (LLaMA-Factory's default collation, right padding, a 2-D mask). With
    neat: the packed rows, a 4-D block-diagonal causal mask and positions restarting per sample
    (LLaMA-Factory's neat_packing), sdpa attention."""
    import numpy as np
    import torch
    import transformers
    from mindsft.data.packing import sample_ids
    from mindsft.models.families import hf_config_of

    threads = set_torch_threads(args.threads)
    config = llama_config(args)
    hf_config = transformers.LlamaConfig(**{k: v for k, v in hf_config_of(config).items()
                                            if k not in ("architectures", "torch_dtype")})
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config)
    with np.load(args.weights) as arrays:
        model.load_state_dict({k: torch.from_numpy(arrays[k]) for k in arrays.files}, strict=False)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    inputs = []
    for batch in micro_batches:
        ids, labels = batch["input_ids"], batch["labels"]
        if neat:
            sample = sample_ids(batch["actual_seq_len"], ids.shape[1])
            ends = batch["actual_seq_len"]
            starts = np.concatenate([np.zeros((len(ends), 1), ends.dtype), ends[:, :-1]], 1)
            positions = np.arange(ids.shape[1])[None] - np.take_along_axis(starts, sample, 1)
            allowed = np.tril(np.ones((ids.shape[1],) * 2, bool))[None] & (sample[:, :, None] == sample[:, None, :])
            mask = torch.zeros(allowed.shape).masked_fill_(torch.from_numpy(~allowed), torch.finfo(torch.float32).min)
            targets = np.where(sample[:, 1:] == sample[:, :-1], labels[:, 1:], IGNORE)
            inputs.append(dict(input_ids=torch.from_numpy(ids).long(), attention_mask=mask[:, None],
                               position_ids=torch.from_numpy(positions).long(), targets=torch.from_numpy(targets).long()))
        else:
            longest = int((ids != 0).sum(1).max())
            inputs.append(dict(input_ids=torch.from_numpy(ids[:, :longest]).long(),
                               attention_mask=torch.from_numpy((ids[:, :longest] != 0).astype(np.int64)),
                               targets=torch.from_numpy(labels[:, 1:longest]).long()))

    def step(batch):
        started = time.perf_counter()
        targets = batch.pop("targets")
        logits = model(**batch).logits[:, :-1]
        # The mean over the batch's learned tokens, as mindsft's step (and HF's loss) takes it.
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.item()
        times.append(time.perf_counter() - started)
        return loss

    shapes = len({b["input_ids"].shape for b in inputs})
    times = []
    started = time.perf_counter()
    losses = [step(batch) for batch in inputs]
    wall = time.perf_counter() - started
    return {"threads": threads, "wall_s": wall, "compile_s": 0.0, "shapes": shapes, "first_loss": losses[0],
            "step_s": float(np.median(times[1:] or times)), "attn_implementation": model.config._attn_implementation}


def worker(args):
    micro_batches = batches(args, args.run)
    computed = sum(b["input_ids"].size for b in micro_batches)
    if args.run == "torch_pad":
        computed = sum(b["input_ids"].shape[0] * int((b["input_ids"] != 0).sum(1).max()) for b in micro_batches)
    real = sum(sample_tokens(b) for b in micro_batches)
    learned = sum(learned_tokens(b) for b in micro_batches)
    if args.run.startswith("torch"):
        result = run_torch(args, micro_batches, neat=args.run == "torch_neat")
    else:
        result = run_mindsft(args, micro_batches)
    result.update(steps=len(micro_batches), learned_tokens=learned, computed_tokens=computed,
                  padding_fraction=1 - real / computed,
                  learned_tokens_per_s=learned / (result["wall_s"] - result["compile_s"]),
                  peak_rss_mib=self_peak_rss_mib())
    print_result(result)


def main(argv=None):
    args = parse_args(argv)
    if args.run:
        worker(args)
        return 0
    import numpy as np
    from mindsft.demo_model import random_llama_arrays

    runs = [r for r in args.runs.split(",") if r]
    passthrough = list(argv if argv is not None else sys.argv[1:])
    results = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_sft_epoch_") as tmp:
        stats = prepare_data(args, tmp)
        weights = os.path.join(tmp, "weights.npz")
        np.savez(weights, **random_llama_arrays(llama_config(args), seed=0))
        threads = None
        for run in runs:
            command = [sys.executable, os.path.abspath(__file__), *passthrough, "--run", run, "--data", tmp,
                       "--weights", weights, "--threads", str(threads or os.cpu_count())]
            code, output, peak, _ = run_measured(command, os.path.join(tmp, f"{run}.log"), env=bench_env(),
                                                 timeout=1200)
            result = read_result(output)
            if code or result is None:
                print(f"{run} failed (exit {code}):\n{output[-4000:]}", file=sys.stderr)
                return 1
            result["peak_rss_mib"] = peak
            results[run] = result
            if "runtime_num_threads" in result["threads"]:
                threads = result["threads"]["runtime_num_threads"] or threads

    packed = stats["packed"]
    subset = f"1 record in {args.every}" if args.every > 1 else "the records"
    limit = f" (at most {args.samples})" if args.samples else ""
    print(f"data: {subset}{limit} of alpaca_en_demo.json, Llama 2 tokenizer, vicuna_v1.1: "
          f"{packed['samples_packed']} samples, {packed['tokens']} tokens, {packed['learned_tokens']} learned; "
          f"packed into {packed['rows']} rows of {args.seq + 1} ({packed['samples_per_row']['mean']} per row, "
          f"efficiency {packed['packing_efficiency']:.1%})")
    print(f"model: bench Llama (hidden 256, 4 layers, 8 heads, vocab 32000), fp32, seq_length {args.seq}, "
          f"batch {args.batch} rows, AdamW + clip 1.0; {os.cpu_count()} CPU cores; bucketed run: "
          f"pad_to_multiple_of {args.bucket}")
    header = f"{'run':38s}{'steps':>6s}{'shapes':>7s}{'wall s':>9s}{'compile s':>10s}{'step s':>8s}" \
             f"{'learned tok/s':>14s}{'padding':>9s}{'peak RSS MiB':>13s}{'loss 1':>9s}"
    print(header)
    for run in runs:
        r = results[run]
        print(f"{str(runs.index(run) + 1) + '. ' + RUNS[run]:38s}{r['steps']:>6d}{r['shapes']:>7d}{r['wall_s']:>9.1f}"
              f"{r['compile_s']:>10.1f}{r['step_s']:>8.2f}{r['learned_tokens_per_s']:>14.0f}{r['padding_fraction']:>9.1%}"
              f"{r['peak_rss_mib']:>13.0f}{r['first_loss']:>9.4f}")
    print("learned tok/s: learned tokens / (wall - compile); compile: the first step of each shape above that "
          "shape's median step (mindsft compiles its step once per shape); step s: the median step, first step of "
          "each shape left out. loss 1: the first step's loss (runs 1, 2 "
          "and 4 see the same first batch, 3 and 5 the same first packed rows; later steps differ: mindsft's AdamW "
          "is MindFormers', without bias correction)")
    learned = {results[r]["learned_tokens"] for r in runs}
    print(f"learned tokens per run: {sorted(learned)} (one value: every run learns the same tokens)")
    for a, b, goal in GOALS:
        if a in results and b in results:
            speedup = ratio(results[a]["learned_tokens_per_s"], results[b]["learned_tokens_per_s"])
            print(f"{RUNS[a]} / {RUNS[b]}: {speedup:.2f}x learned tokens/s (goal >= {goal}x: "
                  f"{'met' if speedup >= goal else 'NOT met'})")
    if "packed" in results and "fixed" in results:
        fixed, packed = results["fixed"], results["packed"]
        print(f"{RUNS['packed']} / {RUNS['fixed']}, in parts: {fixed['steps']}/{packed['steps']} = "
              f"{ratio(fixed['steps'], packed['steps']):.2f}x fewer steps x {ratio(fixed['step_s'], packed['step_s']):.2f}x "
              f"cheaper steady step = {ratio(fixed['steps'] * fixed['step_s'], packed['steps'] * packed['step_s']):.2f}x "
              f"on steady steps; {ratio(fixed['wall_s'], packed['wall_s']):.2f}x on the epoch wall, compiling included")
    if "bucketed" in results and "fixed" in results:
        print(f"{RUNS['bucketed']} / {RUNS['fixed']}: "
              f"{ratio(results['bucketed']['learned_tokens_per_s'], results['fixed']['learned_tokens_per_s']):.2f}x")
    print(f"whole script: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
