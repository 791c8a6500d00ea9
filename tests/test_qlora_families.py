"""QLoRA on every family of the registry: logits and adapter gradients equal transformers + PEFT on
a bitsandbytes base (Llama 2's are in test_qlora.py; Llama 3 adds its rope scaling). Qwen2's q/k/v biases stay unquantized beside their quantized weights (as
bitsandbytes' Linear4bit and Linear8bitLt keep a bias), Qwen3 adds its q/k norms, Mistral its
sliding window (shorter than the batch), Baichuan2 its fused W_pack and NormHead.

Baichuan's reference is transformers' Llama (see family_reference.py) whose q, k and v are the
rows of ONE bitsandbytes layer holding W_pack, with PEFT's LoRA on W_pack: what loading Baichuan's
own modeling code in 4 bits gives. It is not the split projections each quantized by bitsandbytes,
although 4-bit blocks of 64 run along the flattened weight: q's rows come first, then k's, then
v's, so when a part holds a whole number of blocks (hidden² a multiple of 64) the 4-bit codes and
absmax of W_pack are the parts' own. Double quantization is where they differ: its offset is the
mean of all of W_pack's absmax and its 256-blocks of absmax run across the parts. mindsft quantizes
the parts together as W_pack (quant.double_quantize_stacked); hidden 128 here gives each part 256
absmax, whole 256-blocks (as Baichuan2 7B's hidden 4096 does), and hidden 64 parts of 64 absmax,
which share 256-blocks (kept as float32 scales).

Every layer's input size is a multiple of 64 here, as in every released model: bitsandbytes 0.50's
CPU kernel for dequantize_4bit takes the 64-blocks to lie within rows, and dequantizes a weight
whose even input size is not a multiple of 64 (48, 96) differently from its own generic code and
from its CUDA kernel (measured: up to 0.03 on a 0.02-scaled weight), where mindsft follows them.
"""
import json

import mindspore as ms
import numpy as np
import peft
import pytest
import torch
import transformers

bnb = pytest.importorskip("bitsandbytes")

from family_reference import FAMILIES, TorchNormHead, reference_model, write_family_folder  # noqa: E402
from llama_reference import assert_adapter_gradients_equal_peft, random_batch  # noqa: E402
from mindsft import quant  # noqa: E402
from mindsft.convert.peft import hf_module_of  # noqa: E402
from mindsft.lora import load_peft_adapter, lora_modules  # noqa: E402
from mindsft.models.families import FAMILIES as REGISTRY, model_config_from_hf  # noqa: E402
from mindsft.models.quant_linear import Linear4bit, Linear8bit  # noqa: E402
from mindsft.quantized_base import Quantization, build_quantized_llama  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
W_PACK_PROJECTIONS = ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUANTIZATIONS = {
    "nf4_double_quant": (Quantization(4, "nf4", True),
                         dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)),
    "int8": (Quantization(8), dict(load_in_8bit=True)),
}
SIZES = dict(hidden_size=64, intermediate_size=128)
CASES = [("llama3", "nf4_double_quant", SIZES), ("qwen2", "nf4_double_quant", SIZES), ("qwen2", "int8", SIZES), ("qwen3", "nf4_double_quant", SIZES),
         ("qwen3", "int8", SIZES), ("mistral_window_7", "nf4_double_quant", SIZES), ("mistral_window_7", "int8", SIZES),
         ("baichuan2", "nf4_double_quant", dict(SIZES, hidden_size=128)),
         ("baichuan2", "nf4_double_quant", SIZES), ("baichuan2", "int8", SIZES)]


class StackedRows(torch.nn.Module):
    """q, k or v of a Baichuan attention: its rows of the attention's one W_pack product."""

    def __init__(self, attention, start, stop):
        super().__init__()
        self.start, self.stop = start, stop
        object.__setattr__(self, "attention", attention)   # not a submodule: W_pack is the attention's

    def forward(self, hidden):
        return self.attention.W_pack(hidden)[..., self.start:self.stop]


def bnb_layer(weight, quantization):
    """bitsandbytes' layer for a float32 [out, in] weight, as transformers' loader quantizes one."""
    out_features, in_features = weight.shape
    if quantization.bits == 8:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(torch.from_numpy(weight), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                                  compress_statistics=quantization.double_quant, quant_type=quantization.quant_type)
        layer.weight = bnb.nn.Params4bit(torch.from_numpy(weight), requires_grad=False, blocksize=quant.BLOCK_SIZE,
                                         compress_statistics=quantization.double_quant,
                                         quant_type=quantization.quant_type, module=layer)
    return layer.to("cpu")


def reference_qlora(family, reference, quantization, bnb_settings, tmp_path):
    """transformers + PEFT on a bitsandbytes base of `reference` (float32 compute), B matrices random."""
    settings = transformers.BitsAndBytesConfig(**bnb_settings, bnb_4bit_compute_dtype=torch.float32)
    baichuan = FAMILIES[family][0] is None
    if baichuan:
        raw_head = reference.lm_head.weight.detach().clone()
        reference.lm_head = torch.nn.Linear(reference.config.hidden_size, reference.config.vocab_size, bias=False)
        reference.lm_head.weight.data.copy_(raw_head)
    reference.save_pretrained(tmp_path / "reference")
    model = type(reference).from_pretrained(tmp_path / "reference", quantization_config=settings, device_map="cpu",
                                            dtype=torch.float32)
    if baichuan:
        model.lm_head = TorchNormHead(raw_head)
        hidden = model.config.hidden_size
        weights = reference.state_dict()
        for index, layer in enumerate(model.model.layers):
            attention = layer.self_attn
            w_pack = np.concatenate([weights[f"model.layers.{index}.self_attn.{p}_proj.weight"].numpy() for p in "qkv"])
            attention.W_pack = bnb_layer(w_pack, quantization)
            for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
                setattr(attention, name, StackedRows(attention, part * hidden, (part + 1) * hidden))
    targets = W_PACK_PROJECTIONS if baichuan else PROJECTIONS
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                                       task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(tmp_path / "adapter")
    # Training mode: bitsandbytes' CPU inference paths compute in bfloat16 (4-bit) or quantize the
    # activations (8-bit); while training both dequantize the weight and multiply in float32.
    return model.train()


@pytest.mark.parametrize("family, case, sizes", CASES,
                         ids=[f"{f}-{c}-hidden_{s['hidden_size']}" for f, c, s in CASES])
def test_logits_and_adapter_gradients_equal_peft_on_a_bitsandbytes_base(family, case, sizes, tmp_path):
    quantization, bnb_settings = QUANTIZATIONS[case]
    reference = reference_model(family, **sizes)
    write_family_folder(family, reference, tmp_path / "hf")
    config_json = json.loads((tmp_path / "hf" / "config.json").read_text())
    peft_model = reference_qlora(family, reference, quantization, bnb_settings, tmp_path)
    config = model_config_from_hf(config_json)
    ours, _ = build_quantized_llama(config, str(tmp_path / "hf"), quantization)
    load_peft_adapter(ours, tmp_path / "adapter")
    held = lora_modules(ours)["model.layers.1.attention.wk"].base_layer
    assert isinstance(held, Linear4bit if quantization.bits == 4 else Linear8bit)
    assert held.has_bias == (family == "qwen2")
    if family == "baichuan2" and quantization.bits == 4:
        # Each part's 256-blocks of absmax are whole at hidden 128 (kept double-quantized), not at 64.
        assert held.double_quant == (config.hidden_size == 128)

    input_ids, labels = random_batch(config.vocab_size, seq=24)
    with torch.no_grad():
        expected = peft_model(torch.from_numpy(input_ids).long()).logits.numpy()
        with peft_model.disable_adapter():
            base = peft_model(torch.from_numpy(input_ids).long()).logits.numpy()
    assert np.abs(expected - base).max() > 1e-2   # the adapters matter
    logits = ours(ms.Tensor(input_ids)).asnumpy()
    assert np.abs(logits - expected).max() <= 1e-4

    family = REGISTRY[config.family]
    assert_adapter_gradients_equal_peft(ours, peft_model, input_ids, labels,
                                        lambda module: hf_module_of(module, family))


@pytest.mark.parametrize("hidden", [64, 128])
def test_w_pack_parts_hold_what_bitsandbytes_stores_for_the_whole_w_pack(hidden):
    rng = np.random.default_rng(0)
    w_pack = (rng.standard_normal((3 * hidden, hidden)) * 0.02).astype(np.float32)
    packed, state = bnb.functional.quantize_4bit(torch.from_numpy(w_pack), blocksize=64, quant_type="nf4",
                                                 compress_statistics=True)
    whole = bnb.functional.dequantize_4bit(packed, state).numpy()
    parts = [quant.quantize_4bit(w_pack[i * hidden:(i + 1) * hidden], "nf4") for i in range(3)]
    # The 4-bit codes are the same either way: no 64-block straddles two parts.
    assert b"".join(p.packed.tobytes() for p in parts) == packed.numpy().tobytes()
    stacked = quant.double_quantize_stacked(parts)
    assert all(p.double_quant == (hidden == 128) for p in stacked)
    dequantized = np.concatenate([quant.dequantize_4bit(p) for p in stacked])
    # bitsandbytes' offset (a float32 mean) may be one unit in the last place away from ours.
    np.testing.assert_allclose(dequantized, whole, rtol=1e-6, atol=0)
    alone = np.concatenate([quant.dequantize_4bit(quant.quantize_4bit(w_pack[i * hidden:(i + 1) * hidden], "nf4",
                                                                      double_quant=True)) for i in range(3)])
    assert not np.array_equal(alone, whole)   # quantizing the parts alone would not be bitsandbytes' W_pack
