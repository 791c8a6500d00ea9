"""The training loss computed chunk by chunk of rows from the hidden states (the whole [tokens,
vocab] logits never exist) equals the loss of the whole logits, with its gradients: unpacked and
packed rows, tied and untied heads, Baichuan's normalised head, LoRA and QLoRA (4-bit base).

"Today's" loss is the same model with the chunked head turned off (`head_loss_chunk = None`),
whose parity with transformers the parity, packing, LoRA and QLoRA tests prove."""
import json

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from llama_reference import mindsft_twin, random_batch, random_hf_llama
from mindsft.models import llama
from mindsft.models.families import model_config_from_hf

MODEL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=64)


class LossTerms(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, *columns):
        return self.model.loss_terms(*columns)


def loss_and_grads(model, columns):
    params = model.trainable_params()
    (loss_sum, count), grads = ms.jit(ms.value_and_grad(LossTerms(model), None, params, has_aux=True))(*columns)
    return float(loss_sum.asnumpy()), float(count.asnumpy()), {p.name: g.asnumpy() for p, g in zip(params, grads)}


def assert_chunked_equals_whole(model, columns):
    assert model.head_loss_chunk is not None, "g++ is needed to build the fused kernels"
    chunked = loss_and_grads(model, columns)
    model.head_loss_chunk = None
    whole = loss_and_grads(model, columns)
    assert chunked[1] == whole[1]
    assert abs(chunked[0] - whole[0]) <= 1e-5 * max(1.0, abs(whole[0]))
    assert chunked[2].keys() == whole[2].keys()
    for name, grad in whole[2].items():
        np.testing.assert_allclose(chunked[2][name], grad, rtol=1e-5, atol=1e-5 * np.abs(grad).max(), err_msg=name)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # 97 x 5 elements: chunks of 5 rows, the last one shorter, so the loop's seams are exercised.
    monkeypatch.setattr(llama, "HEAD_CHUNK_ELEMENTS", MODEL["vocab_size"] * 5)


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_and_gradients_equal_the_whole_logits(tied):
    model = mindsft_twin(random_hf_llama(**MODEL, tie_word_embeddings=tied))
    input_ids, labels = random_batch(MODEL["vocab_size"], batch=2, seq=17)
    assert_chunked_equals_whole(model, (Tensor(input_ids), Tensor(labels)))


def test_chunked_loss_of_packed_rows_equals_the_whole_logits():
    from test_packing_model import MODEL as PACKED_MODEL, make_samples, packed_batch
    model = mindsft_twin(random_hf_llama(**PACKED_MODEL))
    input_ids, labels, ends = packed_batch(make_samples())
    assert_chunked_equals_whole(model, (Tensor(input_ids), Tensor(labels), Tensor(ends)))


def test_chunked_loss_of_a_normalised_head_equals_the_whole_logits():
    from mindsft.demo_model import random_llama_arrays, tiny_config
    from mindsft.loading import assign_weights
    from mindsft.models.families import hf_to_ms_arrays
    config = tiny_config("baichuan2", vocab_size=97)
    assert config.norm_head
    model = llama.LlamaForCausalLM(config)
    assign_weights(model, hf_to_ms_arrays(random_llama_arrays(config, seed=3), config))
    input_ids, labels = random_batch(97, batch=2, seq=17)
    assert_chunked_equals_whole(model, (Tensor(input_ids), Tensor(labels)))


def random_adapters(model):
    from mindsft.lora import LORA_B, LoraConfig, adapter_state, apply_lora
    apply_lora(model, LoraConfig.from_llamafactory({"lora_target": "all", "lora_rank": 4, "lora_alpha": 8}))
    rng = np.random.default_rng(0)
    for name, param in adapter_state(model).items():
        if name.endswith(LORA_B):
            param.set_data(Tensor(0.2 * rng.standard_normal(param.shape).astype(np.float32)))
    return model


def test_chunked_loss_with_lora_equals_the_whole_logits():
    model = random_adapters(mindsft_twin(random_hf_llama(**MODEL)))
    input_ids, labels = random_batch(MODEL["vocab_size"], batch=2, seq=17)
    assert_chunked_equals_whole(model, (Tensor(input_ids), Tensor(labels)))


def test_chunked_loss_with_qlora_equals_the_whole_logits(tmp_path):
    from mindsft.quant import Quantization
    from mindsft.quantized_base import build_quantized_llama
    random_hf_llama(**MODEL).save_pretrained(tmp_path / "hf")
    with open(tmp_path / "hf" / "config.json") as f:
        config = model_config_from_hf(json.load(f))
    model, _ = build_quantized_llama(config, str(tmp_path / "hf"), Quantization(4, "nf4", True))
    model = random_adapters(model)
    input_ids, labels = random_batch(MODEL["vocab_size"], batch=2, seq=17)
    assert_chunked_equals_whole(model, (Tensor(input_ids), Tensor(labels)))
