"""Our Llama computes what transformers' LlamaForCausalLM computes on the same weights."""
import json

import mindspore as ms
import numpy as np
import pytest
import torch
import transformers

from conftest import shared_file
from llama_reference import mindsft_twin, random_batch, random_hf_llama
from mindsft.models.families import hf_to_ms_arrays, model_config_from_hf
from mindsft.models.llama import LlamaForCausalLM
from mindsft.loading import assign_weights

CONFIGS = {
    "multi_head": {},
    "grouped_kv_8_heads_2_kv": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2),
    "tied_embeddings": dict(tie_word_embeddings=True),
    "rope_theta_500000": dict(rope_theta=500000.0),
    "llama3_rope_scaling": dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "linear_rope_scaling": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "odd_sizes": dict(vocab_size=101, hidden_size=36, intermediate_size=53, num_attention_heads=3,
                      num_key_value_heads=1, num_hidden_layers=3),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_transformers(name):
    hf = random_hf_llama(**CONFIGS[name])
    ours = mindsft_twin(hf)
    input_ids, _ = random_batch(hf.config.vocab_size, seq=40)
    with torch.no_grad():
        expected = hf(torch.from_numpy(input_ids).long()).logits.numpy()
    got = ours(ms.Tensor(input_ids)).asnumpy()
    assert np.abs(got - expected).max() <= 1e-5


def test_logits_equal_transformers_when_compiled():
    hf = random_hf_llama(num_key_value_heads=2)
    ours = mindsft_twin(hf)
    input_ids, _ = random_batch(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(torch.from_numpy(input_ids).long()).logits.numpy()

    @ms.jit
    def compiled_forward(ids):
        return ours(ids)

    got = compiled_forward(ms.Tensor(input_ids)).asnumpy()
    assert np.abs(got - expected).max() <= 1e-5


def test_loss_with_ignored_labels_equals_transformers():
    hf = random_hf_llama(num_key_value_heads=2)
    ours = mindsft_twin(hf)
    input_ids, labels = random_batch(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(torch.from_numpy(input_ids).long(), labels=torch.from_numpy(labels).long()).loss.item()
    got = float(ours(ms.Tensor(input_ids), ms.Tensor(labels)).asnumpy())
    assert abs(got - expected) <= 1e-5


def test_loss_terms_are_sum_and_count_of_learned_tokens():
    hf = random_hf_llama()
    ours = mindsft_twin(hf)
    input_ids, labels = random_batch(hf.config.vocab_size)
    loss_sum, count = ours.loss_terms(ms.Tensor(input_ids), ms.Tensor(labels))
    assert float(count.asnumpy()) == float((labels[:, 1:] != -100).sum())
    mean = float(ours(ms.Tensor(input_ids), ms.Tensor(labels)).asnumpy())
    assert abs(float(loss_sum.asnumpy()) / float(count.asnumpy()) - mean) <= 1e-6


@pytest.mark.parametrize("name", ["grouped_kv_8_heads_2_kv", "tied_embeddings"])
def test_gradients_equal_transformers(name):
    hf = random_hf_llama(**CONFIGS[name])
    ours = mindsft_twin(hf)
    input_ids, labels = random_batch(hf.config.vocab_size)
    hf.zero_grad()
    hf(torch.from_numpy(input_ids).long(), labels=torch.from_numpy(labels).long()).loss.backward()
    expected = hf_to_ms_arrays({n: p.grad.numpy() for n, p in hf.named_parameters()}, ours.config)
    params = ours.trainable_params()
    grads = ms.grad(lambda ids, lab: ours(ids, lab), grad_position=None, weights=params)(
        ms.Tensor(input_ids), ms.Tensor(labels))
    assert len(grads) == len(expected)
    for param, grad in zip(params, grads):
        want = expected[param.name]
        relative = np.abs(grad.asnumpy() - want).max() / (np.abs(want).max() + 1e-12)
        assert relative <= 1e-4, f"{param.name}: relative difference {relative:.2e}"


def test_attention_mask_makes_left_padding_invisible():
    hf = random_hf_llama(num_key_value_heads=2)
    ours = mindsft_twin(hf)
    input_ids, _ = random_batch(hf.config.vocab_size, batch=1, seq=9)
    alone = ours(ms.Tensor(input_ids)).asnumpy()
    padded = np.concatenate([np.zeros((1, 4), np.int32), input_ids], 1)
    mask = np.concatenate([np.zeros((1, 4), np.int32), np.ones_like(input_ids)], 1)
    got = ours(ms.Tensor(padded), attention_mask=ms.Tensor(mask)).asnumpy()[:, 4:]
    assert np.abs(got - alone).max() <= 1e-5


def test_shared_tiny_random_llama_2_equals_transformers():
    model_dir = shared_file("models/tiny-random-llama-2-hf")
    from safetensors.numpy import load_file
    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = model_config_from_hf(json.loads((model_dir / "config.json").read_text()))
    ours = LlamaForCausalLM(config)
    arrays = hf_to_ms_arrays(load_file(model_dir / "model.safetensors"), config)
    assign_weights(ours, arrays, source=str(model_dir))
    input_ids = np.array([[1, 15043, 3186, 29991, 13, 450, 4996]], np.int32)
    with torch.no_grad():
        expected = hf(torch.from_numpy(input_ids).long()).logits.numpy()
    assert np.abs(ours(ms.Tensor(input_ids)).asnumpy() - expected).max() <= 1e-5
