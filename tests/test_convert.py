"""HuggingFace ⇄ MindSpore weight conversion: every input format gives our model the logits
transformers computes, the round trip is bit-exact, and bad input fails with one clear message
and no output left behind."""
import json
import os

import numpy as np
import pytest
import torch
import transformers
import yaml
import mindspore as ms
from safetensors.torch import load_file as load_safetensors_torch

from mindsft.config import load_run_config
from mindsft.convert import hf_to_ms, ms_to_hf
from mindsft.models.families import model_config_from_hf
from mindsft.models.llama import LlamaForCausalLM
from mindsft.loading import assign_weights
from tests.conftest import shared_file
from tests.llama_reference import mindsft_twin, random_batch, random_hf_llama

GQA = dict(num_attention_heads=6, num_key_value_heads=2)


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_llama(seed=3, **GQA)


@pytest.fixture(scope="module")
def hf_logits(hf_model):
    input_ids, _ = random_batch(hf_model.config.vocab_size)
    with torch.no_grad():
        return input_ids, hf_model(torch.tensor(input_ids, dtype=torch.long)).logits.float().numpy()


def save_torch_bin(model, folder, shards=1):
    """Write `pytorch_model.bin` (or `shards` .bin files + index) as transformers 4 did."""
    os.makedirs(folder, exist_ok=True)
    model.config.to_json_file(os.path.join(folder, "config.json"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
        return folder
    names = list(state)
    weight_map = {}
    for index, part in enumerate(np.array_split(np.arange(len(names)), shards), 1):
        file_name = f"pytorch_model-{index:05d}-of-{shards:05d}.bin"
        torch.save({names[i]: state[names[i]] for i in part}, os.path.join(folder, file_name))
        weight_map.update({names[i]: file_name for i in part})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return folder


def save_hf(model, folder, fmt):
    if fmt == "safetensors":
        model.save_pretrained(folder)
    elif fmt == "safetensors-sharded":
        model.save_pretrained(folder, max_shard_size="20KB")
        assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    elif fmt == "bin":
        save_torch_bin(model, folder)
    elif fmt == "bin-sharded":
        save_torch_bin(model, folder, shards=3)
    return str(folder)


def our_logits(ckpt_path, hf_config, input_ids):
    """Logits of our model loaded with mindspore.load_checkpoint from `ckpt_path`."""
    model = LlamaForCausalLM(model_config_from_hf(hf_config))
    params = ms.load_checkpoint(str(ckpt_path))
    assign_weights(model, {name: p.asnumpy() for name, p in params.items()}, source=str(ckpt_path))
    return model(ms.Tensor(input_ids)).asnumpy()


@pytest.mark.parametrize("fmt", ["safetensors", "safetensors-sharded", "bin", "bin-sharded"])
def test_hf_to_ckpt_gives_transformers_logits(fmt, hf_model, hf_logits, tmp_path):
    folder = save_hf(hf_model, tmp_path / "hf", fmt)
    summary = hf_to_ms(folder + "/", tmp_path / "out.ckpt", progress=False)
    input_ids, expected = hf_logits
    got = our_logits(tmp_path / "out.ckpt", hf_model.config.to_dict(), input_ids)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert summary["tensors"] == 2 + 9 * 2 + 1
    assert summary["parameters"] == sum(p.numel() for p in hf_model.parameters())


def test_shared_tiny_random_llama_2_gives_transformers_logits(tmp_path):
    folder = shared_file("models/tiny-random-llama-2-hf")
    reference = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    input_ids, _ = random_batch(reference.config.vocab_size, seq=9)
    with torch.no_grad():
        expected = reference(torch.tensor(input_ids, dtype=torch.long)).logits.float().numpy()
    hf_to_ms(folder, tmp_path / "tiny.ckpt", progress=False)
    with open(folder / "config.json") as f:
        got = our_logits(tmp_path / "tiny.ckpt", json.load(f), input_ids)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_identical_and_transformers_loads_it(dtype, hf_model, tmp_path):
    source = random_hf_llama(seed=5, **GQA).to(dtype)
    source.save_pretrained(tmp_path / "hf")
    hf_to_ms(tmp_path / "hf", tmp_path / "model.ckpt", progress=False)
    summary = ms_to_hf(tmp_path / "model.ckpt", tmp_path / "back", model_config_from_hf(source.config.to_dict()),
                       max_shard_size="30KB", progress=False)
    assert summary["shards"] > 1 and os.path.isfile(tmp_path / "back" / "model.safetensors.index.json")

    original = load_safetensors_torch(str(tmp_path / "hf" / "model.safetensors"))
    back = {}
    for name in sorted(os.listdir(tmp_path / "back")):
        if name.endswith(".safetensors"):
            back.update(load_safetensors_torch(str(tmp_path / "back" / name)))
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype == dtype, name
        assert torch.equal(back[name].view(torch.uint8), tensor.view(torch.uint8)), name

    # Both folders loaded the same way (an in-memory `.to(bfloat16)` model also casts its rotary buffers).
    original_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert reloaded.dtype == dtype
    input_ids = torch.tensor(random_batch(source.config.vocab_size)[0], dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, original_model(input_ids).logits)


def test_dtype_option_matches_torch_casts(hf_model, tmp_path):
    folder = save_hf(hf_model, tmp_path / "hf", "safetensors")
    hf_to_ms(folder, tmp_path / "bf16.ckpt", dtype="bf16", progress=False)
    loaded = ms.load_checkpoint(str(tmp_path / "bf16.ckpt"))
    weight = loaded["model.layers.1.attention.wq.weight"]
    assert weight.dtype == ms.bfloat16
    expected = hf_model.state_dict()["model.layers.1.self_attn.q_proj.weight"].to(torch.bfloat16)
    np.testing.assert_array_equal(weight.astype(ms.float32).asnumpy(), expected.float().numpy())

    # bf16 → fp16 and back to fp32: each step rounds as torch rounds.
    bf16_folder = tmp_path / "hf-bf16"
    random_hf_llama(seed=7).to(torch.bfloat16).save_pretrained(bf16_folder)
    hf_to_ms(bf16_folder, tmp_path / "fp16.ckpt", dtype="fp16", progress=False)
    got = ms.load_checkpoint(str(tmp_path / "fp16.ckpt"))["model.norm_out.weight"]
    assert got.dtype == ms.float16
    reference = load_safetensors_torch(str(bf16_folder / "model.safetensors"))["model.norm.weight"].to(torch.float16)
    np.testing.assert_array_equal(got.asnumpy(), reference.numpy())


def training_checkpoint(hf_model, path):
    """A checkpoint as a MindSpore training run saves it: weights, Adam moments, global_step."""
    model = mindsft_twin(hf_model)
    optimizer = ms.nn.AdamWeightDecay(model.trainable_params(), learning_rate=1e-3)
    entries = [{"name": p.name, "data": p} for p in model.get_parameters()]
    entries += [{"name": p.name, "data": p} for p in list(optimizer.moments1) + list(optimizer.moments2)]
    entries.append({"name": optimizer.global_step.name, "data": optimizer.global_step})
    ms.save_checkpoint(entries, str(path), append_dict={"epoch_num": 1, "step_num": 7})
    return model


def test_mindspore_training_checkpoint_converts_in_reverse(hf_model, hf_logits, tmp_path):
    training_checkpoint(hf_model, tmp_path / "train.ckpt")
    config = model_config_from_hf(hf_model.config.to_dict())
    summary = ms_to_hf(tmp_path / "train.ckpt", tmp_path / "hf", config, progress=False)
    num_params = len(list(hf_model.parameters()))
    assert summary["skipped"] == {"adam_m": num_params, "adam_v": num_params, "global_step": 1,
                                  "epoch_num": 1, "step_num": 1}
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    input_ids, expected = hf_logits
    with torch.no_grad():
        got = reloaded(torch.tensor(input_ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_reverse_reads_model_config_from_a_mindformers_yaml(hf_model, tmp_path):
    c = hf_model.config
    run = {"model": {"model_config": {
        "type": "LlamaConfig", "seq_length": 64, "hidden_size": c.hidden_size, "num_layers": c.num_hidden_layers,
        "num_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads, "vocab_size": c.vocab_size,
        "intermediate_size": c.intermediate_size, "rms_norm_eps": c.rms_norm_eps, "theta": 10000.0,
        "compute_dtype": "bfloat16", "use_flash_attention": True}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    training_checkpoint(hf_model, tmp_path / "train.ckpt")
    config = load_run_config(str(tmp_path / "run.yaml")).model_config
    ms_to_hf(tmp_path / "train.ckpt", tmp_path / "hf", config, progress=False)
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (written["num_key_value_heads"], written["intermediate_size"]) == (2, c.intermediate_size)
    assert transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf") is not None


def test_tokenizer_files_are_copied(tiny_hf_dir, tmp_path):
    hf_to_ms(tiny_hf_dir, tmp_path / "m.ckpt", progress=False)
    config = model_config_from_hf(json.loads((tiny_hf_dir / "config.json").read_text()))
    ms_to_hf(tmp_path / "m.ckpt", tmp_path / "hf", config, tokenizer_dir=tiny_hf_dir, progress=False)
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == (tiny_hf_dir / "tokenizer.model").read_bytes()
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 2
