"""A model whose decoder layer is compiled once and reused (`ReusedDecoderLayer`, MindSpore's lazy
inline) computes what the fully inlined model computes, for every family's flags: the training
loss and every gradient, and KV-cache decoding (prefill, then one-token steps through the fused
decode kernel)."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from llama_reference import random_batch
from mindsft.demo_model import random_llama_arrays, tiny_config
from mindsft.models import llama
from mindsft.loading import assign_weights
from mindsft.models.families import hf_to_ms_arrays

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "baichuan2"]


class LossTerms(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, *columns):
        return self.model.loss_terms(*columns)


def twin_models(family):
    # A window shorter than the rows, so Mistral's masked path runs too.
    config = tiny_config(family, vocab_size=97, **({"sliding_window": 8} if family == "mistral" else {}))
    arrays = hf_to_ms_arrays(random_llama_arrays(config, seed=1), config)
    models = {}
    for reuse in (False, True):
        model = llama.LlamaForCausalLM(config, reuse_layers=reuse)
        assign_weights(model, arrays)
        models[reuse] = model
    assert isinstance(models[True].model.layers[0], llama.ReusedDecoderLayer)
    assert not isinstance(models[False].model.layers[0], llama.ReusedDecoderLayer)
    return models[False], models[True]


def training_terms(model, input_ids, labels):
    params = model.trainable_params()
    (loss_sum, count), grads = ms.jit(ms.value_and_grad(LossTerms(model), None, params, has_aux=True))(
        Tensor(input_ids), Tensor(labels))
    return float(loss_sum.asnumpy()), float(count.asnumpy()), [g.asnumpy() for g in grads]


def decoded_logits(model, prompt, steps=2):
    """Logits of the prefill and of `steps` greedy one-token steps through the key/value cache."""
    def cached_forward(ids, positions, mask, slots, *caches):
        return model.forward_cached(ids, positions, mask, slots, caches)

    forward = ms.jit(cached_forward)
    batch, length = prompt.shape
    total = length + steps
    cache_mask = np.zeros((batch, total), np.int32)
    cache_mask[:, :length] = 1
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    logits, caches = forward(Tensor(prompt), Tensor(positions.copy()), Tensor(cache_mask),
                             Tensor(np.arange(length, dtype=np.int32)), *model.empty_caches(batch, total))
    outputs = [logits.asnumpy()]
    for slot in range(length, total):
        tokens = outputs[-1].argmax(-1).astype(np.int32).reshape(batch, 1)
        cache_mask[:, slot] = 1
        logits, caches = forward(Tensor(tokens), Tensor(np.full((batch, 1), slot, np.int32)), Tensor(cache_mask),
                                 Tensor(np.array([slot], np.int32)), *caches)
        outputs.append(logits.asnumpy())
    return outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_reused_layer_trains_and_decodes_as_the_inlined_one(family):
    inlined, reused = twin_models(family)
    input_ids, labels = random_batch(97, batch=2, seq=17)
    want, got = training_terms(inlined, input_ids, labels), training_terms(reused, input_ids, labels)
    assert got[1] == want[1]
    assert abs(got[0] - want[0]) <= 1e-6 * max(1.0, abs(want[0]))
    for grad, expected in zip(got[2], want[2]):
        np.testing.assert_allclose(grad, expected, rtol=0, atol=1e-6 * max(1.0, np.abs(expected).max()))

    prompt = input_ids[:, :6]
    for got_logits, want_logits in zip(decoded_logits(reused, prompt), decoded_logits(inlined, prompt)):
        np.testing.assert_allclose(got_logits, want_logits, rtol=0, atol=1e-6 * max(1.0, np.abs(want_logits).max()))


@pytest.mark.parametrize("targets", [
    # One layer's wq and another's w2: layers that differ compile apart and train as inlined.
    r"model\.layers\.0\.attention\.wq|model\.layers\.1\.feed_forward\.w2",
    # Every layer alike: still one graph for all.
    r".*wq|.*wv",
])
def test_layers_with_different_adapters_train_as_the_inlined_ones(targets):
    from mindsft.lora import apply_lora
    from mindsft.lora_config import LoraConfig
    inlined, reused = twin_models("llama")
    for model in (inlined, reused):
        apply_lora(model, LoraConfig(rank=4, alpha=8, target_modules=targets), seed=0)
        for param in model.trainable_params():
            if "lora_b" in param.name:
                param.set_data(param.data + 0.1)   # B = 0 would leave the adapters out of the forward
    keys = {layer.cell_init_args for layer in reused.model.layers}
    assert len(keys) == (1 if targets.startswith(".*") else 2)
    input_ids, labels = random_batch(97, batch=2, seq=17)
    want, got = training_terms(inlined, input_ids, labels), training_terms(reused, input_ids, labels)
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    for grad, expected in zip(got[2], want[2]):
        np.testing.assert_allclose(grad, expected, rtol=0, atol=1e-6 * max(1.0, np.abs(expected).max()))
