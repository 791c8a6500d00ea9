"""LoRA computes what PEFT computes, merges exactly, and its adapters travel to and from PEFT."""
import importlib.util
import json
from pathlib import Path

import mindspore as ms
import numpy as np
import peft
import pytest
import torch
import transformers

from llama_reference import mindsft_twin, random_batch, random_hf_llama
from mindsft.errors import ConfigError, ConvertError
from mindsft.convert.peft import read_peft_adapter
from mindsft.weights import read_base_weights
from mindsft.lora import (LORA_A, LORA_B, LoraConfig, adapter_state, apply_lora, load_adapter_state,
                          load_peft_adapter, lora_modules, merge_lora, parameter_report, save_peft_adapter)
from mindsft.models.llama import LlamaForCausalLM
from mindsft.loading import assign_weights

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def merge_main(argv):
    """Run tools/merge_lora.py's main in this process."""
    spec = importlib.util.spec_from_file_location("merge_lora_tool", TOOLS / "merge_lora.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.main(argv)


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GQA = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2)


def peft_model_with_random_adapters(targets, rank=4, alpha=8, use_rslora=False, seed=0, **hf_config):
    """A PEFT LoRA model on a random Llama whose B matrices are non-zero (so the adapters matter)."""
    hf = random_hf_llama(seed=seed, **hf_config)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                             use_rslora=use_rslora, task_type="CAUSAL_LM")
    model = peft.get_peft_model(hf, config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


def hf_logits(model, input_ids):
    with torch.no_grad():
        return model(torch.from_numpy(input_ids).long()).logits.numpy()


def randomize_lora_b(model, seed=0):
    rng = np.random.default_rng(seed)
    for name, param in adapter_state(model).items():
        if name.endswith(LORA_B):
            param.set_data(ms.Tensor(0.2 * rng.standard_normal(param.shape).astype(np.float32)))


# ---- configuration -------------------------------------------------------------------------------

def test_mindformers_pet_config_and_llamafactory_spellings_build_the_same_config():
    mindformers = LoraConfig.from_mindformers({"pet_type": "lora", "lora_rank": 8, "lora_alpha": 16,
                                               "lora_dropout": 0.05, "target_modules": ".*wq|.*wv"})
    llamafactory = LoraConfig.from_llamafactory({"finetuning_type": "lora", "lora_rank": 8, "lora_alpha": 16,
                                                 "lora_dropout": 0.05, "lora_target": "q_proj,v_proj"})
    assert mindformers == llamafactory
    assert mindformers.scaling == 2.0


def test_llamafactory_all_targets_every_decoder_linear_but_not_the_head():
    hf = random_hf_llama()
    model = mindsft_twin(hf)
    chosen = apply_lora(model, LoraConfig.from_llamafactory({"lora_target": "all", "lora_rank": 4}))
    assert len(chosen) == 7 * hf.config.num_hidden_layers
    assert "lm_head" not in chosen
    assert LoraConfig.from_llamafactory({"lora_rank": 4}).alpha == 8.0  # LLaMA-Factory: alpha = 2·rank


@pytest.mark.parametrize("pet_config, message", [
    ({"pet_type": "lora", "lora_rnak": 8}, "did you mean 'lora_rank'"),
    ({"pet_type": "adalora"}, "pet_type 'adalora'"),
    ({"lora_rank": 0}, "lora_rank must be a positive integer"),
    ({"target_modules": "(wq"}, "does not compile"),
])
def test_bad_pet_config_is_one_clear_error(pet_config, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig.from_mindformers(pet_config)


def test_unknown_lora_target_names_the_known_projections():
    with pytest.raises(ConfigError, match="q_porj.*known projections are q_proj"):
        LoraConfig.from_llamafactory({"lora_target": "q_porj"})


def test_mindformers_exclude_layers_skips_matching_cells_and_everything_inside():
    model = mindsft_twin(random_hf_llama())
    chosen = apply_lora(model, LoraConfig.from_mindformers(
        {"pet_type": "lora", "lora_rank": 2, "target_modules": ".*wq|.*w1", "exclude_layers": ["0", "feed_forward"]}))
    assert chosen == ["model.layers.1.attention.wq"]


def test_target_matching_nothing_is_an_error():
    model = mindsft_twin(random_hf_llama())
    with pytest.raises(ConfigError, match="matches no linear layer"):
        apply_lora(model, LoraConfig(target_modules=".*query_key_value"))


def test_lora_cannot_be_applied_twice():
    model = mindsft_twin(random_hf_llama())
    apply_lora(model, LoraConfig(rank=2))
    with pytest.raises(ConfigError, match="already applied"):
        apply_lora(model, LoraConfig(rank=2))


# ---- the layers ----------------------------------------------------------------------------------

def test_base_weights_keep_their_names_and_are_frozen_and_only_adapters_train():
    model = mindsft_twin(random_hf_llama())
    names_before = [p.name for p in model.get_parameters()]
    chosen = apply_lora(model, LoraConfig(rank=4, target_modules=".*wq|.*wv"))
    names_after = [p.name for p in model.get_parameters()]
    assert [n for n in names_after if LORA_A not in n and LORA_B not in n] == names_before
    trainable = [p.name for p in model.trainable_params()]
    assert sorted(trainable) == sorted(f"{m}.{ab}" for m in chosen for ab in (LORA_A, LORA_B))
    assert chosen == ["model.layers.0.attention.wq", "model.layers.0.attention.wv",
                      "model.layers.1.attention.wq", "model.layers.1.attention.wv"]
    trainable_count, total, line = parameter_report(model)
    assert trainable_count == 4 * 4 * (48 + 48) and total == sum(p.size for p in model.get_parameters())
    assert f"trainable params: {trainable_count:,d} || all params: {total:,d}" in line


def test_adapters_start_as_peft_starts_a_kaiming_uniform_b_zero_so_logits_are_unchanged():
    hf = random_hf_llama(hidden_size=128, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4)
    model = mindsft_twin(hf)
    input_ids, _ = random_batch(hf.config.vocab_size)
    before = model(ms.Tensor(input_ids)).asnumpy()
    apply_lora(model, LoraConfig.from_llamafactory({"lora_target": "all", "lora_rank": 8}), seed=3)
    assert np.array_equal(model(ms.Tensor(input_ids)).asnumpy(), before)
    reference = peft.get_peft_model(random_hf_llama(hidden_size=128, intermediate_size=160, num_attention_heads=4,
                                                    num_key_value_heads=4),
                                    peft.LoraConfig(r=8, target_modules="all-linear"))
    ours_a = {n: p.asnumpy() for n, p in adapter_state(model).items() if n.endswith(LORA_A)}
    peft_a = {n: p.detach().numpy() for n, p in reference.named_parameters() if "lora_A" in n}
    for name, value in ours_a.items():
        bound = 1.0 / np.sqrt(value.shape[1])
        assert 0.9 * bound < np.abs(value).max() <= bound, name
    for name, param in adapter_state(model).items():
        if name.endswith(LORA_B):
            assert not param.asnumpy().any(), name
    ours_std = np.concatenate([v.ravel() * np.sqrt(v.shape[1]) for v in ours_a.values()]).std()
    peft_std = np.concatenate([v.ravel() * np.sqrt(v.shape[1]) for v in peft_a.values()]).std()
    assert abs(ours_std / peft_std - 1) < 0.05


# ---- parity with PEFT ----------------------------------------------------------------------------

PARITY_CASES = {
    "q_v_rank4": dict(targets=["q_proj", "v_proj"]),
    "all_linear_gqa_rank8": dict(targets=ALL_PROJECTIONS, rank=8, alpha=16, **GQA),
    "all_linear_rslora": dict(targets=ALL_PROJECTIONS, rank=4, alpha=8, use_rslora=True),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_logits_equal_peft_with_the_same_base_and_adapter_weights(case, tmp_path):
    settings = dict(PARITY_CASES[case])
    reference = peft_model_with_random_adapters(**settings)
    reference.save_pretrained(tmp_path / "adapter")
    hf_config = {k: v for k, v in settings.items() if k in GQA}
    ours = mindsft_twin(random_hf_llama(**hf_config))
    load_peft_adapter(ours, tmp_path / "adapter")
    input_ids, _ = random_batch(reference.config.vocab_size, seq=24)
    expected = hf_logits(reference, input_ids)
    with reference.disable_adapter():
        assert np.abs(hf_logits(reference, input_ids) - expected).max() > 1e-2  # the adapters matter
    assert np.abs(ours(ms.Tensor(input_ids)).asnumpy() - expected).max() <= 1e-5


@pytest.mark.parametrize("case", ["q_v_rank4", "all_linear_gqa_rank8"])
def test_one_step_adapter_gradients_equal_peft(case, tmp_path):
    settings = dict(PARITY_CASES[case])
    reference = peft_model_with_random_adapters(**settings)
    reference.save_pretrained(tmp_path / "adapter")
    ours = mindsft_twin(random_hf_llama(**{k: v for k, v in settings.items() if k in GQA}))
    load_peft_adapter(ours, tmp_path / "adapter")
    input_ids, labels = random_batch(reference.config.vocab_size)
    reference.zero_grad()
    reference(torch.from_numpy(input_ids).long(), labels=torch.from_numpy(labels).long()).loss.backward()
    expected = {}
    for name, param in reference.named_parameters():
        if param.requires_grad:
            module = name[len("base_model.model."):].rsplit(".lora_", 1)[0]
            ab = LORA_A if ".lora_A." in name else LORA_B
            expected[(module, ab)] = param.grad.numpy()
    params = ours.trainable_params()
    grads = ms.grad(lambda ids, lab: ours(ids, lab), grad_position=None, weights=params)(
        ms.Tensor(input_ids), ms.Tensor(labels))
    assert len(grads) == len(expected)
    from mindsft.convert.peft import hf_module_of
    for param, grad in zip(params, grads):
        module, ab = param.name.rsplit(".", 1)
        want = expected[(hf_module_of(module), ab)]
        relative = np.abs(grad.asnumpy() - want).max() / (np.abs(want).max() + 1e-12)
        assert relative <= 1e-4, f"{param.name}: relative difference {relative:.2e}"


# ---- merge ---------------------------------------------------------------------------------------

def test_merged_model_logits_equal_the_unmerged_model_with_adapters():
    model = mindsft_twin(random_hf_llama(**GQA))
    apply_lora(model, LoraConfig(rank=4, alpha=8, target_modules=".*w[qkvo]|.*w[123]"))
    randomize_lora_b(model)
    input_ids, _ = random_batch(model.config.vocab_size)
    unmerged = model(ms.Tensor(input_ids)).asnumpy()
    merge_lora(model)
    assert not lora_modules(model)
    assert all(LORA_A not in p.name for p in model.get_parameters())
    assert len(model.trainable_params()) == len(list(model.get_parameters()))
    assert np.abs(model(ms.Tensor(input_ids)).asnumpy() - unmerged).max() <= 1e-5


def test_merge_tool_writes_a_checkpoint_and_a_hf_folder_that_transformers_loads(tiny_hf_dir, tmp_path):
    base_arrays, config = read_base_weights(str(tiny_hf_dir))
    model = LlamaForCausalLM(config)
    assign_weights(model, base_arrays, source=str(tiny_hf_dir))
    apply_lora(model, LoraConfig.from_llamafactory({"lora_target": "all", "lora_rank": 8}))
    randomize_lora_b(model)
    save_peft_adapter(model, tmp_path / "adapter")
    input_ids, _ = random_batch(config.vocab_size)
    unmerged = model(ms.Tensor(input_ids)).asnumpy()

    assert merge_main(["--base", str(tiny_hf_dir), "--adapter", str(tmp_path / "adapter"),
                       "--output", str(tmp_path / "merged.ckpt"), "--hf_output", str(tmp_path / "merged-hf")]) == 0
    merged_hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged-hf", dtype=torch.float32).eval()
    assert np.abs(hf_logits(merged_hf, input_ids) - unmerged).max() <= 1e-5
    plain = LlamaForCausalLM(config)
    assign_weights(plain, {k: v.asnumpy() for k, v in ms.load_checkpoint(str(tmp_path / "merged.ckpt")).items()},
                   source="merged.ckpt")
    assert np.abs(plain(ms.Tensor(input_ids)).asnumpy() - unmerged).max() <= 1e-5


def test_merge_tool_takes_an_adapter_checkpoint_with_its_pet_config(tiny_hf_dir, tmp_path):
    base_arrays, config = read_base_weights(str(tiny_hf_dir))
    model = LlamaForCausalLM(config)
    assign_weights(model, base_arrays, source=str(tiny_hf_dir))
    apply_lora(model, LoraConfig(rank=4, alpha=32, target_modules=".*wq|.*wv"))
    randomize_lora_b(model)
    ms.save_checkpoint(list(adapter_state(model).values()), str(tmp_path / "adapter.ckpt"))
    (tmp_path / "run.yaml").write_text(json.dumps({"model": {"model_config": {
        "pet_config": {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 32, "target_modules": ".*wq|.*wv"}}}}))
    input_ids, _ = random_batch(config.vocab_size)
    unmerged = model(ms.Tensor(input_ids)).asnumpy()
    assert merge_main(["--base", str(tiny_hf_dir), "--adapter", str(tmp_path / "adapter.ckpt"),
                       "--config", str(tmp_path / "run.yaml"), "--hf_output", str(tmp_path / "hf")]) == 0
    merged_hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert np.abs(hf_logits(merged_hf, input_ids) - unmerged).max() <= 1e-5


def test_merge_tool_refuses_an_adapter_checkpoint_without_its_scaling_and_writes_nothing(tiny_hf_dir, tmp_path,
                                                                                        capsys):
    base_arrays, config = read_base_weights(str(tiny_hf_dir))
    model = LlamaForCausalLM(config)
    apply_lora(model, LoraConfig(rank=2))
    ms.save_checkpoint(list(adapter_state(model).values()), str(tmp_path / "adapter.ckpt"))
    assert merge_main(["--base", str(tiny_hf_dir), "--adapter", str(tmp_path / "adapter.ckpt"),
                       "--output", str(tmp_path / "merged.ckpt")]) == 1
    assert "does not record lora_alpha" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.ckpt"]


def test_merge_of_an_adapter_on_a_layer_the_base_lacks_names_it_and_writes_nothing(tmp_path):
    from mindsft.convert.peft import merge_lora_files, write_ckpt
    small = mindsft_twin(random_hf_llama(num_hidden_layers=1))
    write_ckpt({p.name: p.asnumpy() for p in small.get_parameters()}, str(tmp_path / "base.ckpt"))
    deep = mindsft_twin(random_hf_llama(num_hidden_layers=2))
    apply_lora(deep, LoraConfig(rank=2))
    save_peft_adapter(deep, tmp_path / "adapter")
    with pytest.raises(ConvertError, match="model.layers.1.attention.wq.weight"):
        merge_lora_files(str(tmp_path / "base.ckpt"), str(tmp_path / "adapter"), output=str(tmp_path / "out.ckpt"))
    assert not (tmp_path / "out.ckpt").exists()


# ---- PEFT format ---------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [".*wq|.*wk|.*wv|.*wo|.*w1|.*w2|.*w3", r"model\.layers\.1\.attention\.wv|lm_head"])
def test_exported_adapters_load_in_peft_with_identical_logits(target, tmp_path):
    ours = mindsft_twin(random_hf_llama(**GQA))
    apply_lora(ours, LoraConfig(rank=4, alpha=16, target_modules=target))
    randomize_lora_b(ours)
    save_peft_adapter(ours, tmp_path / "adapter", base_model_name_or_path="random-llama")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 16 and saved["peft_type"] == "LORA"
    loaded = peft.PeftModel.from_pretrained(random_hf_llama(**GQA), tmp_path / "adapter").eval()
    lora_names = [n for n, _ in loaded.named_parameters() if "lora_" in n]
    assert len(lora_names) == 2 * len(lora_modules(ours))
    input_ids, _ = random_batch(ours.config.vocab_size)
    assert np.abs(hf_logits(loaded, input_ids) - ours(ms.Tensor(input_ids)).asnumpy()).max() <= 1e-5


def test_peft_adapter_tensor_names_are_peft_names(tmp_path):
    from safetensors.numpy import load_file
    ours = mindsft_twin(random_hf_llama())
    apply_lora(ours, LoraConfig(rank=2, target_modules=".*wq|.*w2"))
    save_peft_adapter(ours, tmp_path / "adapter")
    names = sorted(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert names[:4] == ["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight",
                         "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight",
                         "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                         "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"] == \
        ["down_proj", "q_proj"]


def test_peft_saved_adapters_load_in_mindsft(tmp_path):
    reference = peft_model_with_random_adapters(["q_proj", "o_proj", "up_proj"], rank=4, alpha=4)
    reference.save_pretrained(tmp_path / "adapter")
    lora_config, arrays = read_peft_adapter(tmp_path / "adapter")
    assert (lora_config.rank, lora_config.alpha) == (4, 4.0)
    ours = mindsft_twin(random_hf_llama())
    load_peft_adapter(ours, tmp_path / "adapter")
    assert sorted(lora_modules(ours)) == sorted(
        f"model.layers.{i}.{m}" for i in range(2) for m in ("attention.wq", "attention.wo", "feed_forward.w3"))
    peft_b = reference.base_model.model.model.layers[1].self_attn.o_proj.lora_B["default"].weight.detach().numpy()
    assert np.array_equal(adapter_state(ours)[f"model.layers.1.attention.wo.{LORA_B}"].asnumpy(), peft_b)


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"modules_to_save": ["embed_tokens"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not LORA"),
])
def test_peft_adapters_mindsft_cannot_represent_are_refused_by_name(change, message, tmp_path):
    reference = peft_model_with_random_adapters(["q_proj"])
    reference.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(ConfigError, match=message):
        read_peft_adapter(tmp_path / "adapter")


def test_adapter_folder_without_weights_is_named(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConvertError, match="adapter: no adapter_model.safetensors"):
        read_peft_adapter(tmp_path / "adapter")


def test_loading_adapters_that_do_not_fit_names_every_offending_tensor():
    model = mindsft_twin(random_hf_llama())
    apply_lora(model, LoraConfig(rank=2, target_modules=".*wq"))
    arrays = {n: p.asnumpy() for n, p in adapter_state(model).items()}
    arrays.pop(f"model.layers.1.attention.wq.{LORA_A}")
    arrays[f"model.layers.0.attention.wq.{LORA_B}"] = np.zeros((48, 3), np.float32)
    with pytest.raises(ConvertError, match=r"adapters missing: model\.layers\.1\.attention\.wq\.mindpet_delta_lora_a"
                                           r".*model\.layers\.0\.attention\.wq\.mindpet_delta_lora_b \(48, 3\)"):
        load_adapter_state(model, arrays, source="x.ckpt")


def test_merge_keeps_a_bfloat16_base_in_bfloat16_and_folds_as_peft_within_one_rounding(tiny_hf_dir, tmp_path):
    base = transformers.LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.bfloat16)
    base.save_pretrained(tmp_path / "bf16")
    _, config = read_base_weights(str(tiny_hf_dir))
    model = LlamaForCausalLM(config)
    apply_lora(model, LoraConfig(rank=4, alpha=8, target_modules=".*wq|.*w2"))
    randomize_lora_b(model)
    save_peft_adapter(model, tmp_path / "adapter")
    assert merge_main(["--base", str(tmp_path / "bf16"), "--adapter", str(tmp_path / "adapter"),
                       "--hf_output", str(tmp_path / "merged")]) == 0
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto")
    reference = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32), tmp_path / "adapter")
    reference = reference.merge_and_unload()
    for name, param in merged.state_dict().items():
        assert param.dtype == torch.bfloat16, name
        want = reference.state_dict()[name].to(torch.bfloat16).float()
        # B·A summed in another order can land a float32 value either side of a bfloat16 rounding
        # boundary: at most one bfloat16 step (2⁻⁷ relative) apart, and rarely.
        differ = param.float() != want
        assert float(differ.float().mean()) < 0.01, name
        assert torch.all((param.float() - want).abs() <= want.abs() * 2 ** -7), name
