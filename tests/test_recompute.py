"""Recomputing each decoder layer in the backward pass (`recompute_config.recompute`) changes no
loss and no gradient beyond 1e-6, with full fine-tuning and with LoRA; a run's YAML turns it on."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from llama_reference import mindsft_twin, random_batch, random_hf_llama
from test_head_loss import LossTerms, random_adapters

MODEL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=64, num_hidden_layers=3)


def loss_and_grads(model, columns):
    params = model.trainable_params()
    (loss_sum, count), grads = ms.jit(ms.value_and_grad(LossTerms(model), None, params, has_aux=True))(*columns)
    return float(loss_sum.asnumpy()), float(count.asnumpy()), [g.asnumpy() for g in grads]


@pytest.mark.parametrize("lora", [False, True])
def test_recomputed_layers_give_the_same_loss_and_gradients(lora):
    hf = random_hf_llama(**MODEL)
    kept, recomputed = mindsft_twin(hf), mindsft_twin(hf)
    if lora:
        kept, recomputed = random_adapters(kept), random_adapters(recomputed)
    recomputed.recompute_layers()
    input_ids, labels = random_batch(MODEL["vocab_size"], batch=2, seq=17)
    columns = (Tensor(input_ids), Tensor(labels))
    want, got = loss_and_grads(kept, columns), loss_and_grads(recomputed, columns)
    assert got[1] == want[1]
    assert abs(got[0] - want[0]) <= 1e-6 * max(1.0, abs(want[0]))
    assert len(got[2]) == len(want[2])
    for grad, expected in zip(got[2], want[2]):
        np.testing.assert_allclose(grad, expected, rtol=0, atol=1e-6 * max(1.0, np.abs(expected).max()))


def test_a_yaml_asking_for_recompute_is_not_told_it_has_no_effect():
    from mindsft.config import build_run_config
    from trainkit import TINY_MODEL
    config = build_run_config({"model": {"model_config": dict(TINY_MODEL)},
                               "recompute_config": {"recompute": True, "select_recompute": True}})
    assert config.recompute_config.recompute is True
    assert "recompute_config.recompute" not in config.no_effect
    assert "recompute_config.select_recompute" in config.no_effect
