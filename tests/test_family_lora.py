"""LoRA on every family: `lora_target` as PEFT spells the family's projections, adapters exported
as PEFT folders that PEFT loads on the family's reference with equal logits. A LoRA on Baichuan's
W_pack is one A and one stacked B, exported under the name W_pack; its reference (Llama with q/k/v
split, see family_reference.py) takes it as the same A on q, k and v and B's rows split."""
import json
import os

import mindspore as ms
import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import load_file, save_file

from family_reference import FAMILIES, reference_model, twin, write_family_folder
from llama_reference import random_batch
from mindsft.convert.peft import merge_lora_files
from mindsft.lora import (LORA_A, LORA_B, LoraConfig, adapter_state, apply_lora, load_peft_adapter, lora_modules,
                          merge_lora, save_peft_adapter)
from mindsft.models.families import family_of

LORA_FAMILIES = ["llama3", "qwen2", "qwen3", "mistral_window_7", "baichuan2"]


def with_lora(model, targets="all", rank=4, seed=0):
    config = LoraConfig.from_llamafactory({"lora_target": targets, "lora_rank": rank, "lora_alpha": 8},
                                          family_of(model.config))
    apply_lora(model, config)
    rng = np.random.default_rng(seed)
    for name, param in adapter_state(model).items():
        if name.endswith(LORA_B):
            param.set_data(ms.Tensor(0.2 * rng.standard_normal(param.shape).astype(np.float32)))
    return model


def split_w_pack(adapter_dir, output_dir, hidden):
    """Baichuan's W_pack adapters as adapters on the reference's q/k/v projections."""
    tensors, out = load_file(os.path.join(adapter_dir, "adapter_model.safetensors")), {}
    for name, value in tensors.items():
        if ".W_pack." not in name:
            out[name] = value
            continue
        for part, projection in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = value if ".lora_A." in name else value[part * hidden:(part + 1) * hidden]
            out[name.replace("W_pack", projection)] = np.ascontiguousarray(rows)
    config = json.loads(open(os.path.join(adapter_dir, "adapter_config.json")).read())
    config["target_modules"] = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in out})
    os.makedirs(output_dir)
    save_file(out, os.path.join(output_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(output_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return output_dir


@pytest.mark.parametrize("family", LORA_FAMILIES)
def test_exported_adapters_load_in_peft_on_the_reference_with_equal_logits(family, tmp_path):
    reference = reference_model(family)
    ours = with_lora(twin(family, reference))
    save_peft_adapter(ours, tmp_path / "adapter")
    adapter = tmp_path / "adapter"
    if FAMILIES[family][0] is None:
        names = load_file(adapter / "adapter_model.safetensors")
        assert "base_model.model.model.layers.0.self_attn.W_pack.lora_B.weight" in names
        assert "W_pack" in json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
        adapter = split_w_pack(adapter, tmp_path / "split", reference.config.hidden_size)
    loaded = peft.PeftModel.from_pretrained(reference, adapter).eval()
    input_ids, _ = random_batch(reference.config.vocab_size, seq=21)
    with torch.no_grad():
        expected = loaded(torch.from_numpy(input_ids).long()).logits.numpy()
        with loaded.disable_adapter():
            base = loaded(torch.from_numpy(input_ids).long()).logits.numpy()
    assert np.abs(expected - base).max() > 1e-2  # the adapters matter
    # 1e-5 relative to the largest logit: with adapters on every projection logits reach ~2, and
    # fp32 rounding of the two frameworks' sums differs by a few units in the 7th digit.
    assert np.abs(ours(ms.Tensor(input_ids)).asnumpy() - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


def test_w_pack_lora_trains_what_peft_trains_on_w_pack_one_a_one_stacked_b(tmp_path):
    reference = reference_model("baichuan2")
    ours = with_lora(twin("baichuan2", reference), targets="W_pack")
    state = adapter_state(ours)
    hidden, rank = reference.config.hidden_size, 4
    assert sorted(state) == sorted(f"model.layers.{i}.attention.w_qkv.{ab}" for i in range(2) for ab in (LORA_A, LORA_B))
    assert state[f"model.layers.0.attention.w_qkv.{LORA_B}"].shape == (3 * hidden, rank)
    assert sorted(lora_modules(ours)) == sorted(f"model.layers.{i}.attention.w{p}" for i in range(2) for p in "qkv")
    save_peft_adapter(ours, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(reference, split_w_pack(tmp_path / "adapter", tmp_path / "split", hidden),
                                            is_trainable=True)
    input_ids, labels = random_batch(reference.config.vocab_size)
    loaded(torch.from_numpy(input_ids).long(), labels=torch.from_numpy(labels).long()).loss.backward()
    grads = {n: p.grad.numpy() for n, p in loaded.named_parameters() if p.requires_grad}
    params = ours.trainable_params()
    ours_grads = ms.grad(lambda ids, lab: ours(ids, lab), grad_position=None, weights=params)(
        ms.Tensor(input_ids), ms.Tensor(labels))
    assert len(params) == 4
    for param, grad in zip(params, ours_grads):
        layer = param.name.split(".")[2]
        peft_names = [f"base_model.model.model.layers.{layer}.self_attn.{p}_proj.lora_{'A' if LORA_A in param.name else 'B'}"
                      f".default.weight" for p in "qkv"]
        # PEFT's W_pack: A's gradient is the sum over q, k, v of what each contributes; B's is stacked.
        want = sum(grads[n] for n in peft_names) if LORA_A in param.name else np.concatenate([grads[n] for n in peft_names])
        relative = np.abs(grad.asnumpy() - want).max() / np.abs(want).max()
        assert relative <= 1e-4, f"{param.name}: relative difference {relative:.2e}"


@pytest.mark.parametrize("family", ["qwen2", "baichuan2"])
def test_merging_keeps_biases_and_folds_packed_adapters(family):
    ours = with_lora(twin(family, reference_model(family)))
    input_ids, _ = random_batch(ours.config.vocab_size)
    unmerged = ours(ms.Tensor(input_ids)).asnumpy()
    merge_lora(ours)
    assert not lora_modules(ours) and not adapter_state(ours)
    assert np.abs(ours(ms.Tensor(input_ids)).asnumpy() - unmerged).max() <= 1e-5


def test_merge_tool_folds_a_w_pack_adapter_into_w_pack_as_peft_merges_it(tmp_path):
    reference = reference_model("baichuan2", seed=1)
    original = write_family_folder("baichuan2", reference, tmp_path / "hf")
    ours = with_lora(twin("baichuan2", reference), targets="W_pack,o_proj")
    save_peft_adapter(ours, tmp_path / "adapter")
    merge_lora_files(str(tmp_path / "hf"), str(tmp_path / "adapter"), hf_output=str(tmp_path / "merged"),
                     progress=False)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    adapters = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.1.self_attn.W_pack"
    expected = original["model.layers.1.self_attn.W_pack.weight"] + \
        2.0 * adapters[f"{prefix}.lora_B.weight"] @ adapters[f"{prefix}.lora_A.weight"]
    assert np.abs(merged["model.layers.1.self_attn.W_pack.weight"] - expected).max() <= 1e-6
    merge_lora(ours)
    input_ids, _ = random_batch(ours.config.vocab_size)
    again = twin("baichuan2", reference)
    from mindsft.loading import load_hf_weights
    load_hf_weights(again, str(tmp_path / "merged"))
    assert np.abs(again(ms.Tensor(input_ids)).asnumpy() - ours(ms.Tensor(input_ids)).asnumpy()).max() <= 1e-5


@pytest.mark.parametrize("family, targets", [("baichuan2", "W_pack,down_proj"), ("qwen2", "q_proj,k_proj")])
def test_compiled_training_step_trains_the_adapters_with_the_gradients_of_the_eager_model(family, targets):
    from mindsft.train.step import AdamWUpdate, TrainStep
    reference = reference_model(family)
    input_ids, labels = random_batch(reference.config.vocab_size)
    eager = with_lora(twin(family, reference), targets)
    loss_sum, count = eager.loss_terms(ms.Tensor(input_ids), ms.Tensor(labels))
    grads = ms.grad(lambda ids, lab: eager.loss_terms(ids, lab)[0], grad_position=None,
                    weights=eager.trainable_params())(ms.Tensor(input_ids), ms.Tensor(labels))
    expected_loss = float(loss_sum.asnumpy()) / float(count.asnumpy())
    expected_norm = np.sqrt(sum(float((g.asnumpy() ** 2).sum()) for g in grads)) / float(count.asnumpy())

    ours = with_lora(twin(family, reference), targets)
    params = ours.trainable_params()
    assert sorted(p.name for p in params) == sorted(adapter_state(ours))
    frozen = {p.name: p.asnumpy().copy() for p in ours.get_parameters() if not p.requires_grad}
    before = {p.name: p.asnumpy().copy() for p in params}
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        step = TrainStep(ours, params, AdamWUpdate(params, 0.9, 0.999, 1e-8, 0.0))
        loss, grad_norm, finite = step.step([{"input_ids": input_ids, "labels": labels}], 1e-3, 1.0)
    finally:
        ms.set_context(mode=mode)
    assert finite and abs(loss - expected_loss) <= 1e-5
    assert abs(grad_norm - expected_norm) <= 1e-5 * expected_norm
    for param in params:
        assert not np.array_equal(param.asnumpy(), before[param.name]), param.name
    for param in ours.get_parameters():
        if param.name in frozen:
            assert np.array_equal(param.asnumpy(), frozen[param.name]), param.name


def test_lora_on_one_part_of_w_pack_is_refused_before_training():
    from mindsft.errors import ConfigError
    model = twin("baichuan2", reference_model("baichuan2"))
    with pytest.raises(ConfigError, match=r"adapts model\.layers\.0\.attention\.wq alone.*W_pack.*'\.\*w_qkv'"):
        apply_lora(model, LoraConfig(target_modules=".*wq|.*wv"))


def test_merge_tool_on_a_converted_checkpoint_reads_its_family_from_the_config_beside_it(tmp_path):
    from mindsft.convert import hf_to_ms
    from mindsft.convert.convert import model_config_path
    reference = reference_model("baichuan2", seed=3)
    write_family_folder("baichuan2", reference, tmp_path / "hf")
    base = tmp_path / "model.ckpt"
    hf_to_ms(tmp_path / "hf", base, progress=False, config_path=model_config_path(base))
    ours = with_lora(twin("baichuan2", reference), targets="W_pack")
    save_peft_adapter(ours, tmp_path / "adapter")
    merged = merge_lora_files(str(base), str(tmp_path / "adapter"), output=str(tmp_path / "merged.ckpt"),
                              progress=False)
    assert sorted(merged) == sorted(f"model.layers.{i}.attention.w{p}.weight" for i in range(2) for p in "qkv")
    # The merged checkpoint carries the base's config, as the converted one does.
    assert json.loads(open(model_config_path(tmp_path / "merged.ckpt")).read()) == \
        json.loads(open(model_config_path(base)).read())
    merge_lora(ours)
    arrays = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(tmp_path / "merged.ckpt")).items()}
    for param in ours.get_parameters():
        assert np.abs(arrays[param.name] - param.asnumpy()).max() <= 1e-6, param.name
