"""KV-cache generation: greedy equals transformers' generate, cached equals recomputed, a batch
equals each prompt alone, sampling is reproducible, and settings read like HF's."""
import json

import numpy as np
import pytest
import torch
import transformers

from llama_reference import mindsft_twin, random_hf_llama
from mindsft.errors import ConfigError
from mindsft.generate import GenerationConfig, Generator, filter_top_k, filter_top_p

CONFIGS = {
    "multi_head": {},
    "grouped_kv_8_heads_2_kv": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2),
    "tied_embeddings": dict(tie_word_embeddings=True, num_key_value_heads=3),
}
EOS = 2


def varied_hf_llama(**config):
    """A random model scaled up so that greedy replies vary instead of repeating one token."""
    hf = random_hf_llama(**config)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" not in name:
                param.mul_(6.0)
    return hf


def random_prompts(vocab_size, lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(3, vocab_size, n).tolist() for n in lengths]


def hf_greedy(hf, prompt, max_new_tokens, **kwargs):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                          eos_token_id=EOS, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=list(CONFIGS))
def twin(request):
    hf = varied_hf_llama(**CONFIGS[request.param])
    return hf, Generator(mindsft_twin(hf))


@pytest.fixture(scope="module")
def gqa_twin():
    hf = varied_hf_llama(**CONFIGS["grouped_kv_8_heads_2_kv"])
    return hf, Generator(mindsft_twin(hf))


def test_greedy_32_tokens_equal_transformers_generate(twin):
    hf, generator = twin
    config = GenerationConfig(max_new_tokens=32, eos_token_id=EOS)
    prompts = random_prompts(hf.config.vocab_size, (4, 11, 21))
    distinct_tokens = set()
    for prompt in prompts:
        expected = hf_greedy(hf, prompt, 32)
        got = generator.generate([prompt], config).sequences[0]
        assert got == expected
        distinct_tokens |= set(expected)
    # The comparison means something only if the replies are not one repeated token.
    assert len(distinct_tokens) >= 8


def test_greedy_with_repetition_penalty_equals_transformers(gqa_twin):
    hf, generator = gqa_twin
    prompt = random_prompts(hf.config.vocab_size, (9,), seed=3)[0]
    expected = hf_greedy(hf, prompt, 24, repetition_penalty=1.3)
    config = GenerationConfig(max_new_tokens=24, eos_token_id=EOS, repetition_penalty=1.3)
    assert generator.generate([prompt], config).sequences[0] == expected


def test_cached_decoding_equals_recomputing_the_whole_sequence(gqa_twin):
    hf, generator = gqa_twin
    prompts = random_prompts(hf.config.vocab_size, (5, 13, 2), seed=1)
    config = GenerationConfig(max_new_tokens=20, eos_token_id=EOS, repetition_penalty=1.1)
    cached = generator.generate(prompts, config, use_cache=True).sequences
    recomputed = generator.generate(prompts, config, use_cache=False).sequences
    assert cached == recomputed


def test_batch_of_different_lengths_equals_each_prompt_alone(gqa_twin):
    hf, generator = gqa_twin
    prompts = random_prompts(hf.config.vocab_size, (3, 17, 8, 1), seed=2)
    config = GenerationConfig(max_new_tokens=16, eos_token_id=EOS)
    batch = generator.generate(prompts, config)
    alone = [generator.generate([p], config).sequences[0] for p in prompts]
    assert batch.sequences == alone
    assert batch.prefill_tokens == sum(len(p) for p in prompts)


def test_generation_stops_at_any_stop_id_and_keeps_it(gqa_twin):
    hf, generator = gqa_twin
    prompt = random_prompts(hf.config.vocab_size, (6,), seed=4)[0]
    free = generator.generate([prompt], GenerationConfig(max_new_tokens=16, eos_token_id=EOS)).sequences[0]
    stop = free[5]
    first = free.index(stop)
    config = GenerationConfig(max_new_tokens=16, eos_token_id=EOS, stop_token_ids=[stop])
    out = generator.generate([prompt], config)
    assert out.sequences[0] == free[:first + 1]
    assert out.stopped == [True]
    assert generator.generate([prompt], GenerationConfig(max_new_tokens=16, eos_token_id=[EOS, stop])
                              ).sequences[0] == free[:first + 1]


def test_sampling_with_a_seed_is_reproducible_and_top_k_1_is_greedy(gqa_twin):
    hf, generator = gqa_twin
    prompts = random_prompts(hf.config.vocab_size, (5, 9), seed=5)
    sampled = GenerationConfig(max_new_tokens=16, eos_token_id=EOS, do_sample=True, temperature=1.5,
                               top_k=0, top_p=0.95, seed=7)
    first = generator.generate(prompts, sampled).sequences
    assert generator.generate(prompts, sampled).sequences == first
    other_seeds = [generator.generate(prompts, sampled.updated(seed=s)).sequences for s in (8, 9)]
    assert any(seqs != first for seqs in other_seeds)
    greedy = generator.generate(prompts, GenerationConfig(max_new_tokens=16, eos_token_id=EOS)).sequences
    top1 = generator.generate(prompts, sampled.updated(top_k=1, top_p=1.0)).sequences
    assert top1 == greedy


def test_top_k_and_top_p_filters_equal_transformers_warpers():
    logits = np.random.RandomState(0).randn(3, 50).astype(np.float32) * 3
    logits[1, 10] = logits[1, 11]  # a tie at the boundary is kept by both
    torch_logits = torch.from_numpy(logits.copy())
    for top_k in (1, 5, 49):
        expected = transformers.TopKLogitsWarper(top_k)(None, torch_logits.clone()).numpy()
        np.testing.assert_array_equal(filter_top_k(logits, top_k), expected)
    for top_p in (0.1, 0.5, 0.9, 0.999):
        expected = transformers.TopPLogitsWarper(top_p)(None, torch_logits.clone()).numpy()
        np.testing.assert_array_equal(filter_top_p(logits, top_p), expected)


def test_generation_config_reads_hf_generation_config_json(tiny_hf_dir):
    path = tiny_hf_dir / "generation_config.json"
    config = GenerationConfig.from_json_file(path)
    hf = transformers.GenerationConfig.from_pretrained(tiny_hf_dir)
    assert config.eos_token_id == hf.eos_token_id
    assert config.bos_token_id == hf.bos_token_id


def test_generation_config_rejects_unknown_keys_with_a_suggestion():
    with pytest.raises(ConfigError, match="'max_new_token'.*did you mean 'max_new_tokens'"):
        GenerationConfig.from_mapping({"max_new_token": 8})
    with pytest.raises(ConfigError, match="beam sampling"):
        GenerationConfig.from_mapping({"num_beams": 4, "do_sample": True})
    with pytest.raises(ConfigError, match="top_p"):
        GenerationConfig(top_p=0.0)


def test_max_length_counts_the_prompt():
    config = GenerationConfig.from_mapping(json.loads('{"max_length": 20, "transformers_version": "5"}'))
    assert config.new_token_budget(longest_prompt=12) == 8
    with pytest.raises(ConfigError, match="max_length 20"):
        config.new_token_budget(longest_prompt=20)
    # MindFormers' max_decode_length is the same total length.
    assert GenerationConfig.from_mapping({"max_decode_length": 20}).new_token_budget(12) == 8
