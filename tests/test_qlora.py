"""QLoRA: LoRA on a 4-bit or 8-bit frozen base computes what transformers + PEFT compute on a
bitsandbytes base, a run through run_mindformer.py learns, resumes exactly and exports a PEFT
adapter, and loading a quantized base never holds the full-precision model."""
import json
import shutil
import subprocess
import sys

import mindspore as ms
import numpy as np
import peft
import pytest
import torch
import transformers

pytest.importorskip("bitsandbytes")

from llama_reference import assert_adapter_gradients_equal_peft, random_batch, random_hf_llama  # noqa: E402
from mindsft.config import build_run_config  # noqa: E402
from mindsft.errors import ConfigError  # noqa: E402
from mindsft.convert.peft import hf_module_of  # noqa: E402
from mindsft.lora import LORA_A, LORA_B, load_peft_adapter, lora_modules  # noqa: E402
from mindsft.models.families import model_config_from_hf  # noqa: E402
from mindsft.models.llama import LlamaConfig  # noqa: E402
from mindsft.models.quant_linear import Linear4bit, Linear8bit  # noqa: E402
from mindsft.quantized_base import Quantization, build_quantized_llama  # noqa: E402
from trainkit import ROOT, cli_args, env, losses, run_python, write_qa_mindrecord, write_start_checkpoint  # noqa: E402

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
CASES = {
    "nf4_double_quant": (Quantization(4, "nf4", True),
                         dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)),
    "fp4": (Quantization(4, "fp4", False),
            dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False)),
    "int8": (Quantization(8), dict(load_in_8bit=True)),
}


def reference_qlora(hf_dir, bnb_settings, adapter_dir, seed=0):
    """transformers + PEFT on a bitsandbytes base (float32 compute), B matrices random, adapter saved."""
    quantization = transformers.BitsAndBytesConfig(**bnb_settings, bnb_4bit_compute_dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, quantization_config=quantization,
                                                             device_map="cpu", dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=ALL_PROJECTIONS, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(adapter_dir)
    # Training mode: bitsandbytes' CPU inference paths compute in bfloat16 (4-bit) or quantize the
    # activations (8-bit); while training both dequantize the weight and multiply in float32.
    return model.train()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qlora") / "hf"
    random_hf_llama(**SHAPE).save_pretrained(path)
    return path


def ours_from(hf_dir, quantization, adapter_dir):
    with open(hf_dir / "config.json") as f:
        config = model_config_from_hf(json.load(f))
    model, report = build_quantized_llama(config, str(hf_dir), quantization)
    load_peft_adapter(model, adapter_dir)
    return model, report


@pytest.mark.parametrize("kernels", ["fused", "mindspore_ops"])
@pytest.mark.parametrize("case", CASES)
def test_dequantized_weight_equals_bitsandbytes_dequantization_exactly(case, kernels, monkeypatch):
    from mindsft import quant
    from mindsft import cpu_kernels
    from mindsft.models.quant_linear import quantized_linear
    monkeypatch.setattr(cpu_kernels, "_OPS", {})
    monkeypatch.setenv("MINDSFT_CPU_KERNELS", "1" if kernels == "fused" else "0")
    quantization = CASES[case][0]
    weight = (np.random.default_rng(0).standard_normal((33, 35)) * 0.05).astype(np.float32)  # a short last block
    cell = quantized_linear(weight, quantization.bits, quantization.quant_type, quantization.double_quant)
    assert cell.fused == (kernels == "fused")
    if quantization.bits == 4:
        expected = quant.dequantize_4bit(quant.quantize_4bit(weight, quantization.quant_type, quantization.double_quant))
    else:
        expected = quant.dequantize_int8_rows(quant.quantize_int8_rows(weight))
    assert np.array_equal(cell.dequantize(ms.Tensor(np.zeros(1, np.float32))).asnumpy(), expected)


@pytest.mark.parametrize("case", CASES)
def test_logits_and_adapter_gradients_equal_peft_on_a_bitsandbytes_base(case, hf_dir, tmp_path):
    quantization, bnb_settings = CASES[case]
    reference = reference_qlora(hf_dir, bnb_settings, tmp_path / "adapter")
    ours, _ = ours_from(hf_dir, quantization, tmp_path / "adapter")

    # The stored base is bitsandbytes' own: packed 4-bit codes / int8 rows byte for byte.
    theirs = reference.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight
    held = lora_modules(ours)["model.layers.1.feed_forward.w2"].base_layer
    assert isinstance(held, Linear4bit if quantization.bits == 4 else Linear8bit)
    assert held.weight.asnumpy().reshape(-1)[:theirs.numel()].tobytes() == theirs.data.numpy().tobytes()

    input_ids, labels = random_batch(reference.config.vocab_size, seq=24)
    with torch.no_grad():
        expected = reference(torch.from_numpy(input_ids).long()).logits.numpy()
    logits = ours(ms.Tensor(input_ids)).asnumpy()
    assert np.abs(logits - expected).max() <= 1e-4

    assert assert_adapter_gradients_equal_peft(ours, reference, input_ids, labels, hf_module_of) == 2 * 7 * 2


def test_base_is_frozen_and_its_report_gives_bytes_before_and_after(hf_dir, tmp_path):
    reference_qlora(hf_dir, CASES["nf4_double_quant"][1], tmp_path / "adapter")
    ours, report = ours_from(hf_dir, Quantization(4, "nf4", True), tmp_path / "adapter")
    assert all(LORA_A in p.name or LORA_B in p.name for p in ours.trainable_params())
    assert "QLoRA base (4-bit nf4, double quantization)" in report and " -> " in report
    # The head stays in full precision, as transformers keeps lm_head out of bitsandbytes.
    assert ours.lm_head.weight.dtype == ms.float32


# ---- settings -----------------------------------------------------------------------------------

def run_config(**keys):
    return build_run_config({"model": {"model_config": {"hidden_size": 32, "num_layers": 1, "num_heads": 4,
                                                        "vocab_size": 64, "seq_length": 8}}, **keys})


def test_llamafactory_quantization_keys_are_accepted_with_lora():
    config = run_config(finetuning_type="lora", quantization_bit=4, quantization_type="fp4", double_quantization=False)
    assert (config.quantization_bit, config.quantization_type, config.double_quantization) == (4, "fp4", False)


@pytest.mark.parametrize("keys, message", [
    (dict(quantization_bit=4), "only LoRA adapters can be trained on it; set finetuning_type: lora"),
    (dict(quantization_bit=3, finetuning_type="lora"), "quantization_bit 3 is not 4 or 8"),
    (dict(quantization_bit=4, quantization_type="nf3", finetuning_type="lora"), "did you mean 'nf4'"),
])
def test_bad_quantization_settings_are_one_clear_error(keys, message):
    with pytest.raises(ConfigError, match=message):
        run_config(**keys)


# ---- through run_mindformer.py ------------------------------------------------------------------

QLORA = {"finetuning_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_target": "all", "quantization_bit": 4}
STEADY = {"runner_config.batch_size": 4, "lr_schedule.type": "constant", "optimizer.learning_rate": 1e-2,
          "lr_schedule.learning_rate": 1e-2, "callbacks.1.save_checkpoint_steps": 4}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qlora_data")
    write_qa_mindrecord(folder / "qa", num_records=8, seed=5)
    write_start_checkpoint(folder / "start.ckpt", seed=1, initializer_range=0.2)
    return folder


def train(output_dir, dataset, **overrides):
    result = run_python(cli_args(output_dir, dataset / "qa", dataset / "start.ckpt", **{**QLORA, **STEADY, **overrides}))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_qlora_run_learns_resumes_exactly_and_exports_an_adapter_peft_loads(tmp_path, dataset):
    whole = tmp_path / "whole"
    result = train(whole, dataset, **{"runner_config.epochs": 8})
    assert "QLoRA base (4-bit nf4, double quantization)" in result.stdout
    loss = losses(whole)
    assert np.mean(loss[-4:]) < 0.8 * np.mean(loss[:4])
    final = ms.load_checkpoint(str(whole / "checkpoint" / "llama_tiny_final_lora.ckpt"))
    assert final and all(".mindpet_delta_lora_" in name for name in final)

    first = tmp_path / "first"
    train(first, dataset, **{"runner_config.epochs": 4})
    resumed = tmp_path / "resumed"
    shutil.copytree(first, resumed)
    train(resumed, dataset, **{"runner_config.epochs": 8, "resume_training": True})
    np.testing.assert_allclose(losses(resumed), loss, atol=1e-6, rtol=0)

    adapter = whole / "peft_adapter"
    loaded = peft.PeftModel.from_pretrained(random_hf_llama(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                            num_attention_heads=4, num_key_value_heads=2),
                                            adapter)
    state = {k: v for k, v in loaded.state_dict().items() if "lora_B" in k}
    assert len(state) == 2 * 7 and all(v.abs().max() > 0 for v in state.values())


# ---- memory while loading ------------------------------------------------------------------------

LOADER_PROBE = r"""
import json, sys
from mindsft.models.llama import LlamaConfig
from mindsft.quantized_base import Quantization, build_quantized_llama

def peak_mb():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) / 1024

config = LlamaConfig(**json.loads(sys.argv[2]))
import mindspore  # noqa: F401  (its own footprint is not the loader's)
from mindsft.models.llama import LlamaForCausalLM  # noqa: F401
before = peak_mb()
model, report = build_quantized_llama(config, sys.argv[1], Quantization(4, "nf4", True))
held = sum(p.size * p.itemsize for p in model.get_parameters()) / 2**20
print(json.dumps({"before": before, "after": peak_mb(), "held": held}))
"""


def test_loading_a_4bit_base_peaks_near_the_quantized_size_plus_one_tensor(tmp_path):
    shape = dict(vocab_size=4096, hidden_size=1024, num_layers=8, num_heads=8, n_kv_heads=8,
                 intermediate_size=4096, seq_length=64)
    path = write_start_checkpoint(tmp_path / "base.ckpt", **shape)
    config = LlamaConfig(**shape)
    full_mb = path.stat().st_size / 2**20
    largest_mb = max(config.vocab_size * config.hidden_size, config.intermediate_size * config.hidden_size) * 4 / 2**20
    result = subprocess.run([sys.executable, "-c", LOADER_PROBE, str(path), json.dumps(shape)], cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    # Quantizing one tensor holds it in float32, its scaled copy and its codes: a few times its size.
    margin_mb = 3 * largest_mb + 64
    grown = measured["after"] - measured["before"]
    assert grown <= measured["held"] + margin_mb, (measured, full_mb)
    assert grown < 0.5 * full_mb, (measured, full_mb)


# ---- packed rows ---------------------------------------------------------------------------------

def test_packed_rows_on_a_4bit_base_give_each_samples_losses_and_adapter_gradients_alone(tmp_path):
    from mindspore import Tensor
    from mindsft.lora import LoraConfig, adapter_state, apply_lora
    from test_packing_model import MODEL, LossSum, assert_packed_losses_equal, make_samples, token_losses
    random_hf_llama(**MODEL).save_pretrained(tmp_path / "hf")
    with open(tmp_path / "hf" / "config.json") as f:
        config = model_config_from_hf(json.load(f))
    model, _ = build_quantized_llama(config, str(tmp_path / "hf"), Quantization(4, "nf4", True))
    apply_lora(model, LoraConfig.from_llamafactory({"lora_target": "all", "lora_rank": 4, "lora_alpha": 8}))
    rng = np.random.default_rng(0)
    for name, param in adapter_state(model).items():
        if name.endswith(LORA_B):
            param.set_data(ms.Tensor(0.2 * rng.standard_normal(param.shape).astype(np.float32)))
    assert model.model.fused_causal, "g++ is needed to build the fused kernel"
    params = model.trainable_params()
    grad_fn = ms.value_and_grad(LossSum(model), None, params)

    rows = make_samples()
    expected_losses, expected_grads = [], [np.zeros(p.shape, np.float32) for p in params]
    for ids, labels in (sample for samples in rows for sample in samples):
        expected_losses.append(token_losses(model(Tensor(ids[None])).asnumpy()[0], labels))
        if len(ids) == 1:
            continue   # no target, no gradient (and MindSpore's slice gradient fails on an empty slice)
        ends = Tensor(np.array([[len(ids)]], np.int32))
        _, grads = grad_fn(Tensor(ids[None]), Tensor(labels[None]), ends)
        expected_grads = [total + g.asnumpy() for total, g in zip(expected_grads, grads)]

    input_ids, labels, ends = assert_packed_losses_equal(model, rows, expected_losses)
    loss_sum, grads = ms.jit(grad_fn)(Tensor(input_ids), Tensor(labels), Tensor(ends))
    assert abs(float(loss_sum.asnumpy()) - np.nansum(np.concatenate(expected_losses))) <= 1e-4
    for param, grad, want in zip(params, grads, expected_grads):
        relative = np.abs(grad.asnumpy() - want).max() / (np.abs(want).max() + 1e-12)
        assert relative <= 1e-4, f"{param.name}: relative difference {relative:.2e}"
