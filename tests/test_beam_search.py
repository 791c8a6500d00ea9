"""Beam search with the KV cache chooses exactly the tokens of transformers' generate(num_beams=4)
on the same weights: with and without a length penalty, every early_stopping mode, stopping at
eos or any of several stop ids, for one prompt and for a left-padded batch."""
import numpy as np
import pytest
import torch

from llama_reference import mindsft_twin
from mindsft.errors import ConfigError
from mindsft.generate import BeamSearch, GenerationConfig, Generator, beam_candidates
from test_generate import random_prompts, varied_hf_llama

BEAMS = 4
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def twin():
    hf = varied_hf_llama(hidden_size=64, num_attention_heads=8, num_key_value_heads=2)
    return hf, Generator(mindsft_twin(hf))


def hf_beam_search(hf, prompts, eos, max_new_tokens=NEW_TOKENS, **kwargs):
    """transformers' replies, left-padded as ours are, each cut after its first stop id."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, num_beams=BEAMS,
                          max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0, **kwargs)
    stops = set(eos if isinstance(eos, list) else [eos])
    replies = []
    for row in out[:, width:].tolist():
        ends = [i for i, token in enumerate(row) if token in stops]
        replies.append(row[:ends[0] + 1] if ends else row)
    return replies


def ours(generator, prompts, eos, max_new_tokens=NEW_TOKENS, **kwargs):
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos, num_beams=BEAMS, **kwargs)
    return generator.generate(prompts, config)


@pytest.fixture(scope="module")
def prompt_and_eos(twin):
    """One prompt, and an eos id that its beams meet early: the 5th token of transformers' reply
    when the eos id is one it never produces (the last id here), so that finished and running
    beams compete."""
    hf, _ = twin
    never = hf.config.vocab_size - 1
    prompt = random_prompts(hf.config.vocab_size, (9,), seed=3)
    free = hf_beam_search(hf, prompt, eos=never)[0]
    assert never not in free
    return prompt, free[4]


@pytest.mark.parametrize("settings", [
    {}, {"length_penalty": 0.0}, {"length_penalty": 2.0}, {"length_penalty": -1.0},
    {"early_stopping": True}, {"early_stopping": "never", "length_penalty": 1.5},
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_one_prompt_equals_transformers_beam_search(twin, prompt_and_eos, settings):
    hf, generator = twin
    prompt, eos = prompt_and_eos
    expected = hf_beam_search(hf, prompt, eos, **settings)
    got = ours(generator, prompt, eos, **settings)
    assert got.sequences == expected
    assert got.stopped == [expected[0][-1] == eos]


def test_length_penalty_changes_which_beam_wins(twin, prompt_and_eos):
    # Without this the parity above could hold on replies where the penalty plays no part.
    hf, generator = twin
    prompt, eos = prompt_and_eos
    short = ours(generator, prompt, eos).sequences[0]
    long = ours(generator, prompt, eos, length_penalty=2.0).sequences[0]
    assert short[-1] == eos and len(short) < NEW_TOKENS
    assert len(long) == NEW_TOKENS and eos not in long


@pytest.mark.parametrize("eos", [2, 4, 18, [2, 4]], ids=lambda e: f"eos={e}")
@pytest.mark.parametrize("settings", [{}, {"length_penalty": 0.0}, {"repetition_penalty": 1.3}],
                         ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_left_padded_batch_equals_transformers_beam_search(twin, eos, settings):
    hf, generator = twin
    prompts = random_prompts(hf.config.vocab_size, (3, 17, 8, 1), seed=2)
    expected = hf_beam_search(hf, prompts, eos, max_new_tokens=16, **settings)
    assert ours(generator, prompts, eos, max_new_tokens=16, **settings).sequences == expected


def test_without_the_fused_kernels_beam_search_chooses_the_same_tokens(twin, monkeypatch):
    """The fused decode path (attention kernel, candidates picked in the graph) and MindSpore's
    own ops (the logits on the host) are two ways to the same beams."""
    hf, fused = twin
    assert fused.model.model.fused_decode and fused.beam_forward(2 * BEAMS) is not None
    monkeypatch.setenv("MINDSFT_CPU_KERNELS", "0")
    plain = Generator(mindsft_twin(hf))
    assert not plain.model.model.fused_decode and plain.beam_forward(2 * BEAMS) is None
    prompts = random_prompts(hf.config.vocab_size, (5, 12), seed=4)
    expected = hf_beam_search(hf, prompts, eos=2, max_new_tokens=12)
    assert ours(plain, prompts, 2, max_new_tokens=12).sequences == expected
    assert ours(fused, prompts, 2, max_new_tokens=12).sequences == expected


def test_the_first_step_expands_only_the_first_beam():
    # All beams start equal; with the others at -1e9 the first step must not pick one token 4 times.
    search = BeamSearch(batch=1, num_beams=BEAMS, new_tokens=5, stop_ids=[0])
    log_probs = np.log(np.full((BEAMS, 10), 0.1, np.float32))
    log_probs[:, 3] = np.log(0.5)
    rows, tokens = search.step(*beam_candidates(log_probs, search.running_scores.reshape(-1), search.candidates))
    assert rows.tolist() == [0, 0, 0, 0]
    assert len(set(tokens.tolist())) == BEAMS and tokens[0] == 3


def test_beam_settings_are_checked():
    assert GenerationConfig.from_mapping({"num_beams": 4, "early_stopping": "true"}).early_stopping is True
    with pytest.raises(ConfigError, match="beam sampling"):
        GenerationConfig(num_beams=4, do_sample=True)
    with pytest.raises(ConfigError, match="early_stopping"):
        GenerationConfig(num_beams=4, early_stopping="sometimes")
    with pytest.raises(ConfigError, match="num_beams 0"):
        GenerationConfig(num_beams=0)
