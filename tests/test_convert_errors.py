"""Bad input to the converter: one clear error naming the file or tensor, nothing executed from
a pickle, and no output left behind."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from mindsft.convert import hf_to_ms, ms_to_hf
from mindsft.convert.safetensors_format import read_safetensors, write_safetensors
from mindsft.errors import ConvertError
from mindsft.models.families import model_config_from_hf


@pytest.fixture()
def hf_dir(tiny_hf_dir, tmp_path):
    """A private copy of the tiny HuggingFace model, free to damage."""
    return shutil.copytree(tiny_hf_dir, tmp_path / "hf")


def rewrite_safetensors(path, edit):
    """Rewrite a safetensors file after `edit({name: array})` (storage arrays)."""
    arrays = {name: t.to_numpy() for name, t in read_safetensors(path)[0].items()}
    dtypes_of = {name: t.dtype for name, t in read_safetensors(path)[0].items()}
    edit(arrays)
    tmp = str(path) + ".new"
    write_safetensors(tmp, [(n, dtypes_of.get(n, "float32"), a.shape, [a.reshape(-1)]) for n, a in arrays.items()])
    os.replace(tmp, path)


def assert_fails_cleanly(run, output, *fragments):
    with pytest.raises(ConvertError) as error:
        run()
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message
    assert not os.path.exists(output)
    folder = os.path.dirname(output)
    leftovers = [n for n in os.listdir(folder) if n.startswith(".")] if os.path.isdir(folder) else []
    assert not leftovers, f"temporary files left behind: {leftovers}"
    return message


def test_missing_input_names_the_path(tmp_path):
    out = tmp_path / "out" / "m.ckpt"
    assert_fails_cleanly(lambda: hf_to_ms(tmp_path / "nowhere", out, progress=False), out,
                         str(tmp_path / "nowhere"), "not found")
    os.makedirs(tmp_path / "empty")
    assert_fails_cleanly(lambda: hf_to_ms(tmp_path / "empty", out, progress=False), out, "no weights found")


def test_missing_config_json_is_named(hf_dir, tmp_path):
    os.remove(hf_dir / "config.json")
    out = tmp_path / "out" / "m.ckpt"
    assert_fails_cleanly(lambda: hf_to_ms(hf_dir, out, progress=False), out, "config.json", "not found")


def test_truncated_safetensors_is_named(hf_dir, tmp_path):
    weights = hf_dir / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 1000)
    out = tmp_path / "out" / "m.ckpt"
    assert_fails_cleanly(lambda: hf_to_ms(hf_dir, out, progress=False), out, "model.safetensors is truncated")
    with open(weights, "r+b") as f:
        f.truncate(5)
    assert_fails_cleanly(lambda: hf_to_ms(hf_dir, out, progress=False), out, "model.safetensors is truncated")


def test_unknown_tensors_are_all_listed(hf_dir, tmp_path):
    def rename(arrays):
        arrays["model.layers.0.self_attn.query.weight"] = arrays.pop("model.layers.0.self_attn.q_proj.weight")
        arrays["model.layers.1.mlp.gate.weight"] = arrays.pop("model.layers.1.mlp.gate_proj.weight")
    rewrite_safetensors(hf_dir / "model.safetensors", rename)
    out = tmp_path / "out" / "m.ckpt"
    assert_fails_cleanly(lambda: hf_to_ms(hf_dir, out, progress=False), out, "2 tensor(s)", "does not know",
                         "model.layers.0.self_attn.query.weight", "model.layers.1.mlp.gate.weight")


def test_missing_tensor_is_named(hf_dir, tmp_path):
    rewrite_safetensors(hf_dir / "model.safetensors", lambda a: a.pop("model.layers.1.post_attention_layernorm.weight"))
    out = tmp_path / "out" / "m.ckpt"
    assert_fails_cleanly(lambda: hf_to_ms(hf_dir, out, progress=False), out, "missing for the config",
                         "model.layers.1.post_attention_layernorm.weight")


def test_shape_disagreeing_with_config_is_named(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] = 96
    (hf_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out" / "m.ckpt"
    assert_fails_cleanly(lambda: hf_to_ms(hf_dir, out, progress=False), out, "disagree with",
                         "config.json", "model.layers.0.mlp.gate_proj.weight [128, 64]", "expected [96, 64]")


def test_non_llama_architecture_is_refused(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (hf_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out" / "m.ckpt"
    assert_fails_cleanly(lambda: hf_to_ms(hf_dir, out, progress=False), out, "GPT2LMHeadModel",
                         "not a Llama-family model")


class CreatesAFile:
    """Unpickling this calls open(path, 'w'): what a malicious checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_bin_is_refused_and_runs_nothing(hf_dir, tmp_path):
    victim = tmp_path / "pwned.txt"
    os.remove(hf_dir / "model.safetensors")
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "payload": CreatesAFile(str(victim))},
               hf_dir / "pytorch_model.bin")
    out = tmp_path / "out" / "m.ckpt"
    assert_fails_cleanly(lambda: hf_to_ms(hf_dir, out, progress=False), out, "pytorch_model.bin", "refused")
    assert not victim.exists()
    # The payload is live: an unguarded load does create the file.
    torch.load(hf_dir / "pytorch_model.bin", weights_only=False)
    assert victim.exists()


def test_truncated_bin_is_named(hf_dir, tmp_path):
    from safetensors.torch import load_file
    state = load_file(str(hf_dir / "model.safetensors"))
    os.remove(hf_dir / "model.safetensors")
    torch.save(state, hf_dir / "pytorch_model.bin")
    with open(hf_dir / "pytorch_model.bin", "r+b") as f:
        f.truncate(os.path.getsize(hf_dir / "pytorch_model.bin") // 2)
    out = tmp_path / "out" / "m.ckpt"
    assert_fails_cleanly(lambda: hf_to_ms(hf_dir, out, progress=False), out, "pytorch_model.bin",
                         "truncated or corrupt")


def test_missing_shard_is_named(tiny_hf_dir, tmp_path):
    import transformers
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_hf_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(n for n in os.listdir(tmp_path / "sharded") if n.endswith(".safetensors"))
    os.remove(tmp_path / "sharded" / shards[-1])
    out = tmp_path / "out" / "m.ckpt"
    assert_fails_cleanly(lambda: hf_to_ms(tmp_path / "sharded", out, progress=False), out, shards[-1],
                         "not found", "model.safetensors.index.json")


@pytest.fixture()
def ckpt_and_config(tiny_hf_dir, tmp_path):
    hf_to_ms(tiny_hf_dir, tmp_path / "m.ckpt", progress=False)
    config = model_config_from_hf(json.loads((tiny_hf_dir / "config.json").read_text()))
    return tmp_path / "m.ckpt", config


def test_truncated_ckpt_is_named_in_reverse(ckpt_and_config, tmp_path):
    ckpt, config = ckpt_and_config
    with open(ckpt, "r+b") as f:
        f.truncate(os.path.getsize(ckpt) - 100)
    out = tmp_path / "out" / "hf"
    assert_fails_cleanly(lambda: ms_to_hf(ckpt, out, config, progress=False), out, "m.ckpt is truncated")


def test_corrupt_ckpt_is_named_in_reverse(ckpt_and_config, tmp_path):
    ckpt, config = ckpt_and_config
    ckpt.write_bytes(b"\x00\x01not a checkpoint" * 10)
    out = tmp_path / "out" / "hf"
    assert_fails_cleanly(lambda: ms_to_hf(ckpt, out, config, progress=False), out, "m.ckpt is corrupt")


def test_reverse_with_the_wrong_config_names_tensors(ckpt_and_config, tmp_path):
    ckpt, config = ckpt_and_config
    config.num_layers = 3
    out = tmp_path / "out" / "hf"
    assert_fails_cleanly(lambda: ms_to_hf(ckpt, out, config, progress=False), out, "missing for the config",
                         "model.layers.2.attention.wq.weight")


def test_reverse_refuses_an_output_folder_holding_other_files(ckpt_and_config, tmp_path):
    ckpt, config = ckpt_and_config
    os.makedirs(tmp_path / "busy")
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="notes.txt"):
        ms_to_hf(ckpt, tmp_path / "busy", config, progress=False)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_failed_conversion_keeps_the_previous_output(hf_dir, tmp_path):
    out = tmp_path / "m.ckpt"
    hf_to_ms(hf_dir, out, progress=False)
    before = out.read_bytes()
    rewrite_safetensors(hf_dir / "model.safetensors", lambda a: a.pop("lm_head.weight"))
    with pytest.raises(ConvertError, match="lm_head.weight"):
        hf_to_ms(hf_dir, out, progress=False)
    assert out.read_bytes() == before
    assert np.array_equal(sorted(os.listdir(tmp_path)), sorted(["hf", "m.ckpt"]))
