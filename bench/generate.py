"""Decode speed: mindsft with the KV cache, mindsft recomputing the sequence, and transformers'
generate, greedy and with beam search, on the same random weights, in one process on the CPU.

    python bench/generate.py [--hidden 512 --layers 4 --prompt 32 --new 32 --batch 1 --beams 4]

Decode tokens/s counts the tokens after the first (the first comes from the prefill) over the
time after the prefill; with beam search every beam's tokens count (batch x beams a step).
Every run is warmed up first so compilation is not counted; mindsft's and transformers' timed runs
take turns, so that a drift of the machine's speed falls on both.
"""
import argparse
import os
import time

os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from mindsft.generate import GenerationConfig, Generator  # noqa: E402
from mindsft.loading import assign_weights  # noqa: E402
from mindsft.models.families import hf_to_ms_arrays, model_config_from_hf  # noqa: E402
from mindsft.models.llama import LlamaForCausalLM  # noqa: E402


def build_models(args):
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096, eos_token_id=2, bos_token_id=1)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    config = model_config_from_hf(hf.config.to_dict())
    ours = LlamaForCausalLM(config)
    assign_weights(ours, hf_to_ms_arrays({k: v.detach().numpy() for k, v in hf.state_dict().items()}, config),
                   source="transformers")
    return hf, ours


def hf_runner(hf, prompts, num_beams=1):
    """run(n) -> (seconds, output ids) of transformers' generate of exactly n new tokens."""
    ids = torch.tensor(prompts)

    def run(n):
        with torch.no_grad():
            start = time.perf_counter()
            out = hf.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                              num_beams=num_beams)
            return time.perf_counter() - start, out
    return run


def time_side_by_side(generator, prompts, config, hf, num_beams, repeats):
    """mindsft's best run and transformers' best generate of all new tokens and of one (its
    prefill), the two taking turns: the machine's speed drifts over a run (its memory bandwidth is
    shared), and turns give both the same moments. Each is warmed up (compiled) first."""
    run = hf_runner(hf, prompts, num_beams)
    generator.generate(prompts, config)
    run(config.max_new_tokens)
    ours, full, prefill = None, float("inf"), float("inf")
    for _ in range(repeats):
        out = generator.generate(prompts, config)
        if ours is None or out.decode_tokens_per_second > ours.decode_tokens_per_second:
            ours = out
        full = min(full, run(config.max_new_tokens)[0])
        prefill = min(prefill, run(1)[0])
    hf_tokens = run(config.max_new_tokens)[1][:, len(prompts[0]):].tolist()
    return ours, full, prefill, hf_tokens


def time_ours(generator, prompts, config, use_cache, repeats):
    generator.generate(prompts, config, use_cache=use_cache)
    outputs = [generator.generate(prompts, config, use_cache=use_cache) for _ in range(repeats)]
    best = max(outputs, key=lambda o: o.decode_tokens_per_second)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--new", type=int, default=32, help="new tokens per prompt")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--beams", type=int, default=4, help="num_beams of the beam search rows (1: none)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per setting, mindsft and transformers taking turns (best kept)")
    args = parser.parse_args()

    hf, ours = build_models(args)
    generator = Generator(ours)
    rng = np.random.RandomState(0)
    prompts = rng.randint(3, args.vocab, (args.batch, args.prompt)).tolist()
    # eos -1: never stop early, so every setting decodes the same number of tokens.
    config = GenerationConfig(max_new_tokens=args.new, eos_token_id=-1)

    print(f"model: hidden {args.hidden}, layers {args.layers}, heads {args.heads}/{args.kv_heads} kv, "
          f"vocab {args.vocab}; batch {args.batch}, prompt {args.prompt}, new {args.new}; "
          f"torch threads {torch.get_num_threads()}")
    cached, hf_full, hf_prefill, hf_tokens = time_side_by_side(generator, prompts, config, hf, 1, args.repeats)
    recomputed = time_ours(generator, prompts, config, False, args.repeats)
    hf_decode_rate = args.batch * (args.new - 1) / (hf_full - hf_prefill)
    hf_prefill_rate = args.batch * args.prompt / hf_prefill

    rows = [("mindsft, KV cache", cached.prefill_tokens_per_second, cached.decode_tokens_per_second),
            ("mindsft, recompute", recomputed.prefill_tokens_per_second, recomputed.decode_tokens_per_second),
            ("transformers generate", hf_prefill_rate, hf_decode_rate)]
    print(f"{'':24s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'decode vs transformers':>23s}")
    for name, prefill_rate, decode_rate in rows:
        print(f"{name:24s} {prefill_rate:14.1f} {decode_rate:13.1f} {decode_rate / hf_decode_rate:22.2f}x")
    print(f"KV cache vs recompute (decode): "
          f"{cached.decode_tokens_per_second / recomputed.decode_tokens_per_second:.2f}x")
    print(f"same greedy tokens as transformers: {cached.sequences == hf_tokens}")
    if args.beams > 1:
        time_beam_search(args, hf, generator, prompts, config)


def time_beam_search(args, hf, generator, prompts, config):
    beam_config = config.updated(num_beams=args.beams)
    beam, hf_full, hf_prefill, hf_tokens = time_side_by_side(generator, prompts, beam_config, hf, args.beams,
                                                             args.repeats)
    hf_decode_rate = args.batch * args.beams * (args.new - 1) / (hf_full - hf_prefill)
    print(f"beam search, num_beams {args.beams} (decode tokens/s counts every beam):")
    print(f"{'mindsft, KV cache':24s} {beam.decode_tokens_per_second:13.1f} tok/s "
          f"{beam.decode_tokens_per_second / hf_decode_rate:6.2f}x")
    print(f"{'transformers generate':24s} {hf_decode_rate:13.1f} tok/s {1.0:6.2f}x")
    print(f"same beam search tokens as transformers: {beam.sequences == hf_tokens}")


if __name__ == "__main__":
    main()
