"""Step time and peak memory of a DPO step (sigmoid) in mindsft and in TRL's DPOTrainer on the same
model shape and pairs, for the three references: LoRA with its adapters off, a frozen full copy,
and precomputed log-probabilities.

Each variant runs in its own process so that its peak resident memory is its own; the first steps
(compilation in mindsft) are timed apart from the steady ones. Prints each variant's figures and
the ratios (speed: TRL's step time / ours; memory: ours / TRL's). Example:
python bench/dpo.py --steps 3
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, bench_env, print_result, ratio, read_result, run_measured,  # noqa: E402
                     self_peak_rss_mib, set_torch_threads, mindspore_threads)

REFERENCES = ("lora", "copy", "precomputed")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (prompt + reply)")
    parser.add_argument("--pairs", type=int, default=2, help="pairs per step (2x sequences per forward)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--only", choices=REFERENCES, nargs="+", default=list(REFERENCES))
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "REFERENCE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def pairs(args):
    """A batch of pairs: a shared prompt of half the row, replies of a quarter and a half of the rest."""
    import numpy as np
    rng = np.random.RandomState(0)
    prompt = args.seq // 2
    ids = rng.randint(3, args.vocab, (2, args.pairs, args.seq)).astype(np.int32)
    ids[1, :, :prompt] = ids[0, :, :prompt]
    lengths = (args.seq, prompt + (args.seq - prompt) // 2)
    labels = np.full_like(ids, -100)
    for side, length in enumerate(lengths):
        ids[side, :, length:] = 0
        labels[side, :, prompt:length] = ids[side, :, prompt:length]
    return ids, labels, lengths


def timed(step, args):
    started = time.perf_counter()
    for _ in range(args.warmup):
        step()
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    return first, (time.perf_counter() - started) / args.steps


def run_mindsft(args, reference):
    import numpy as np
    import mindspore as ms
    from mindsft.lora import LoraConfig, apply_lora
    from mindsft.models.llama import LlamaConfig, LlamaForCausalLM
    from mindsft.train.preference import LiveReference, PreferenceLoss, PreferenceSettings
    from mindsft.train.step import AdamWUpdate, TrainStep

    ms.set_context(mode=ms.GRAPH_MODE)
    # The recipe's call depth (MindFormers' max_call_depth): a deep model with LoRA on every
    # projection exceeds MindSpore's default when the step compiles.
    ms.set_recursion_limit(10000)
    ms.set_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                         num_heads=args.heads, intermediate_size=args.intermediate, seq_length=args.seq,
                         max_position_embeddings=args.seq)
    model = LlamaForCausalLM(config)
    if reference == "lora":
        apply_lora(model, LoraConfig.from_llamafactory({"lora_target": "all", "lora_rank": args.rank}))
        live = LiveReference(model, adapters_off=True)
    elif reference == "copy":
        copy = LlamaForCausalLM(config)
        for param in copy.get_parameters():
            param.requires_grad = False
        live = LiveReference(copy)
    ids, labels, _ = pairs(args)
    batch = {"chosen_input_ids": ids[0], "chosen_labels": labels[0], "rejected_input_ids": ids[1],
             "rejected_labels": labels[1]}
    if reference == "precomputed":
        batch["ref_chosen_logps"] = np.full(args.pairs, -500.0, np.float32)
        batch["ref_rejected_logps"] = np.full(args.pairs, -300.0, np.float32)
    params = model.trainable_params()
    step = TrainStep(PreferenceLoss(model, PreferenceSettings()), params,
                     AdamWUpdate(params, 0.9, 0.999, 1e-8, 0.0), max_grad_norm=1.0)

    def one_step():
        micro = dict(batch)
        if reference != "precomputed":
            live.fill(micro)  # as the recipe does before each step
        return step.step([micro], 1e-5, 1.0)

    first, steady = timed(one_step, args)
    return {"first_s": first, "step_s": steady, "threads": mindspore_threads()}


def run_trl(args, reference):
    import copy
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    threads = set_torch_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                      num_attention_heads=args.heads, num_key_value_heads=args.heads,
                                      intermediate_size=args.intermediate, max_position_embeddings=args.seq)
    model = transformers.LlamaForCausalLM(config)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1, "c": 2},
                                                                                    unk_token="a")),
                                        eos_token="c", pad_token="a", bos_token="b")
    peft_config = None
    ref_model = None
    if reference == "lora":
        import peft
        peft_config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"])
    elif reference == "copy":
        ref_model = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as folder:
        trainer = trl.DPOTrainer(
            model=model, ref_model=ref_model, peft_config=peft_config, processing_class=tokenizer,
            train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2),
            args=trl.DPOConfig(output_dir=folder, report_to=[], use_cpu=True, bf16=False, max_length=None,
                               per_device_train_batch_size=args.pairs, beta=0.1, loss_type=["sigmoid"],
                               precompute_ref_log_probs=reference == "precomputed"))
    model = trainer.model
    ids, labels, lengths = pairs(args)
    input_ids = torch.from_numpy(ids.reshape(2 * args.pairs, args.seq)).long()
    length = torch.tensor([lengths[0]] * args.pairs + [lengths[1]] * args.pairs)
    batch = {"input_ids": input_ids,
             "attention_mask": (torch.arange(args.seq)[None] < length[:, None]).long(),
             "completion_mask": torch.from_numpy(labels.reshape(2 * args.pairs, args.seq) != -100).long()}
    if reference == "precomputed":
        batch["ref_chosen_logps"] = torch.full((args.pairs,), -500.0)
        batch["ref_rejected_logps"] = torch.full((args.pairs,), -300.0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    model.train()

    def one_step():
        optimizer.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.item()

    first, steady = timed(one_step, args)
    return {"first_s": first, "step_s": steady, "threads": threads}


def worker(args):
    side, reference = args.worker
    result = (run_mindsft if side == "mindsft" else run_trl)(args, reference)
    result["peak_rss_mib"] = self_peak_rss_mib()
    print_result(result)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    shape = (f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}, "
             f"{args.pairs} pairs of {args.seq} tokens")
    print(f"DPO (sigmoid) step, {shape}; {args.warmup} untimed + {args.steps} timed steps, "
          "each variant its own process")
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = {}
    with tempfile.TemporaryDirectory() as logs:
        for reference in args.only:
            for side in ("mindsft", "trl"):
                code, output, peak, _ = run_measured(
                    [sys.executable, str(Path(__file__).resolve()), *passed, "--worker", side, reference],
                    os.path.join(logs, f"{side}-{reference}.log"), env=bench_env(), cwd=ROOT)
                result = read_result(output)
                if code != 0 or result is None:
                    print(f"{side} {reference}: failed (exit {code})\n{output[-2000:]}")
                    continue
                result["peak_rss_mib"] = peak
                results[(side, reference)] = result
                print(f"{side:8s} {reference:12s} step {result['step_s'] * 1000:8.1f} ms   first {args.warmup} "
                      f"{result['first_s']:6.2f} s   peak RSS {peak:7.0f} MiB")
    for reference in args.only:
        ours, theirs = results.get(("mindsft", reference)), results.get(("trl", reference))
        if ours and theirs:
            print(f"{reference:12s} speed vs TRL {ratio(theirs['step_s'], ours['step_s']):.2f}x   "
                  f"memory vs TRL {ratio(ours['peak_rss_mib'], theirs['peak_rss_mib']):.2f}x")
    if ("mindsft", "copy") in results:
        copy_peak = results[("mindsft", "copy")]["peak_rss_mib"]
        for reference in ("lora", "precomputed"):
            if ("mindsft", reference) in results:
                print(f"mindsft {reference} peak RSS / full-copy reference: "
                      f"{ratio(results[('mindsft', reference)]['peak_rss_mib'], copy_peak):.2f}x")


if __name__ == "__main__":
    main()
