"""Every model family computes what its reference computes on the same weights: logits, loss and
gradients, greedy generation through the key/value cache; its weights go HF → ckpt → HF bit for
bit. The references are transformers' own classes (Llama 3 with its rope scaling, Qwen2, Qwen3,
Mistral with a window shorter than the sequence); Baichuan2's modeling code is not part of
transformers, so its reference is LlamaForCausalLM with W_pack split and a row-normalising head
(see family_reference.py)."""
import json
import os
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from family_reference import FAMILIES, hf_files, reference_arrays_as_ours, reference_model, twin, write_family_folder
from llama_reference import random_batch
from mindsft.convert import hf_to_ms, ms_to_hf
from mindsft.errors import ConfigError
from mindsft.generate import GenerationConfig, Generator
from mindsft.models.config import LlamaConfig
from mindsft.cpu_kernels import causal_attention
from mindsft.models.families import family_named, model_config_from_hf


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_the_reference(family):
    reference = reference_model(family)
    ours = twin(family, reference)
    input_ids, _ = random_batch(reference.config.vocab_size, seq=40)
    with torch.no_grad():
        expected = reference(torch.from_numpy(input_ids).long()).logits.numpy()
    assert np.abs(ours(ms.Tensor(input_ids)).asnumpy() - expected).max() <= 1e-5
    if causal_attention(ours.config.head_dim) is not None:
        assert ours.model.fused_causal  # head size 32 (Llama 3, Qwen3): this checks the fused CPU attention


@pytest.mark.parametrize("family", ["qwen3", "mistral_window_7", "baichuan2"])
def test_logits_equal_the_reference_when_compiled(family):
    reference = reference_model(family)
    ours = twin(family, reference)
    input_ids, _ = random_batch(reference.config.vocab_size, seq=23)
    with torch.no_grad():
        expected = reference(torch.from_numpy(input_ids).long()).logits.numpy()

    @ms.jit
    def compiled_forward(ids):
        return ours(ids)

    got = compiled_forward(ms.Tensor(input_ids)).asnumpy()
    assert np.abs(got - expected).max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_gradients_equal_the_reference(family):
    reference = reference_model(family)
    ours = twin(family, reference)
    input_ids, labels = random_batch(reference.config.vocab_size, seq=19)
    reference.zero_grad()
    loss = reference(torch.from_numpy(input_ids).long(), labels=torch.from_numpy(labels).long()).loss
    loss.backward()
    assert abs(float(ours(ms.Tensor(input_ids), ms.Tensor(labels)).asnumpy()) - loss.item()) <= 1e-5
    expected = reference_arrays_as_ours({n: p.grad.numpy() for n, p in reference.named_parameters()}, ours.config)
    params = ours.trainable_params()
    grads = ms.grad(lambda ids, lab: ours(ids, lab), grad_position=None, weights=params)(
        ms.Tensor(input_ids), ms.Tensor(labels))
    assert sorted(p.name for p in params) == sorted(expected)
    for param, grad in zip(params, grads):
        want = expected[param.name]
        relative = np.abs(grad.asnumpy() - want).max() / (np.abs(want).max() + 1e-12)
        assert relative <= 1e-4, f"{param.name}: relative difference {relative:.2e}"


def test_mistral_window_changes_what_is_attended():
    reference = reference_model("mistral_window_7")
    windowed = twin("mistral_window_7", reference)
    unwindowed = twin("mistral_window_7", reference_model("mistral_window_7", sliding_window=None))
    input_ids, _ = random_batch(reference.config.vocab_size, seq=12)
    a, b = windowed(ms.Tensor(input_ids)).asnumpy(), unwindowed(ms.Tensor(input_ids)).asnumpy()
    assert np.abs(a[:, :7] - b[:, :7]).max() <= 1e-5 and np.abs(a[:, 7:] - b[:, 7:]).max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_identical_and_loads_in_transformers(family, tmp_path):
    reference = reference_model(family, seed=4)
    original = write_family_folder(family, reference, tmp_path / "hf")
    hf_to_ms(tmp_path / "hf", tmp_path / "model.ckpt", progress=False, config_path=tmp_path / "model.config.json")
    config = model_config_from_hf(json.loads((tmp_path / "model.config.json").read_text()))
    assert config == model_config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()))
    ms_to_hf(tmp_path / "model.ckpt", tmp_path / "back", config, progress=False)
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(back) == sorted(original)
    for name, value in original.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name].view(np.uint8), value.view(np.uint8)), name
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert model_config_from_hf(written) == config
    if FAMILIES[family][0] is None:
        return  # Baichuan's modeling code ships with its weights, not with transformers
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(reloaded) is type(reference)
    input_ids = torch.tensor(random_batch(reference.config.vocab_size)[0], dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, reference(input_ids).logits)


def test_baichuan_w_pack_is_split_into_q_k_v_and_stacked_back(tmp_path):
    reference = reference_model("baichuan2", seed=2)
    original = write_family_folder("baichuan2", reference, tmp_path / "hf")
    hf_to_ms(tmp_path / "hf", tmp_path / "model.ckpt", progress=False)
    stored = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(tmp_path / "model.ckpt")).items()}
    hidden = reference.config.hidden_size
    for part, name in enumerate(("wq", "wk", "wv")):
        assert np.array_equal(stored[f"model.layers.1.attention.{name}.weight"],
                              original["model.layers.1.self_attn.W_pack.weight"][part * hidden:(part + 1) * hidden])
    assert not any("W_pack" in name or "w_qkv" in name for name in stored)


@pytest.mark.parametrize("name, family", [("qwen2", "qwen2"), ("qwen2.5", "qwen2"), ("qwen3", "qwen3"),
                                          ("mistral", "mistral"), ("baichuan2", "baichuan2"), ("llama3", "llama")])
def test_mindformers_model_names_pick_the_family(name, family):
    assert family_named(name).name == family


def test_family_flags_of_a_mindformers_yaml_come_with_its_arch_type():
    from mindsft.config import resolve_model_config
    from types import SimpleNamespace
    shape = dict(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, seq_length=16)
    run = SimpleNamespace(model=SimpleNamespace(arch={"type": "Qwen2ForCausalLM"}, model_config=shape),
                          pretrained_model_dir="", load_checkpoint="")
    config = resolve_model_config(run)
    assert config.family == "qwen2" and config.qkv_has_bias


@pytest.mark.parametrize("hf_config, message", [
    ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True}, "use_sliding_window=true"),
    ({"architectures": ["BaichuanForCausalLM"], "num_hidden_layers": 40, "hidden_size": 5120}, "ALiBi"),
    ({"architectures": ["BaichuanForCausalLM"], "rope_theta": 5e5}, "rope_theta"),
])
def test_configs_a_family_cannot_run_are_one_clear_error(hf_config, message):
    with pytest.raises(ConfigError, match=message):
        model_config_from_hf({"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                              "intermediate_size": 8, **hf_config}, "x/config.json")


def test_norm_head_with_tied_embeddings_is_refused():
    with pytest.raises(ConfigError, match="norm_head"):
        LlamaConfig(norm_head=True, tie_word_embeddings=True)


# ---- generation ---------------------------------------------------------------------------------

def reference_greedy(reference, prompt, max_new_tokens, eos):
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# Tied embeddings are covered by test_generate.py (a tied random model repeats one token here).
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("qwen3_head_dim_20", "qwen2_tied")])
def test_greedy_generation_equals_transformers_generate_and_stops_at_the_end_token(family):
    reference = reference_model(family, scale=6.0)
    generator = Generator(twin(family, reference))
    rng = np.random.RandomState(1)
    for length in (5, 11):
        prompt = rng.randint(3, reference.config.vocab_size, length).tolist()
        free = reference_greedy(reference, prompt, 20, eos=10**6)
        assert len(set(free)) > 3, "the reply should vary"
        got = generator.generate([prompt], GenerationConfig(max_new_tokens=20, eos_token_id=10**6)).sequences[0]
        assert got == free
        # The end token: one the reply produces on its own, so both must stop right after it.
        eos = free[len(free) // 2]
        expected = reference_greedy(reference, prompt, 20, eos=eos)
        out = generator.generate([prompt], GenerationConfig(max_new_tokens=20, eos_token_id=eos))
        assert out.sequences[0] == expected and expected[-1] == eos and out.stopped[0]


def test_model_config_of_every_family_reads_back_from_its_config_json():
    for family in FAMILIES:
        config_json, _ = hf_files(family, reference_model(family))
        config = model_config_from_hf(config_json)
        assert model_config_from_hf(family_named(config.family).config_to_hf(config)) == config


# ---- configs --------------------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REAL_SIZES = {  # (file, family, hidden, layers, heads, kv heads, head_dim, vocab), as each model's config.json
    "llama3/finetune_llama3_1_8b.yaml": ("llama", 4096, 32, 32, 8, 128, 128256),
    "qwen2/finetune_qwen2_5_7b.yaml": ("qwen2", 3584, 28, 28, 4, 128, 152064),
    "qwen3/finetune_qwen3_8b.yaml": ("qwen3", 4096, 36, 32, 8, 128, 151936),
    "mistral/finetune_mistral_7b_v0_3.yaml": ("mistral", 4096, 32, 32, 8, 128, 32768),
    "baichuan2/finetune_baichuan2_7b.yaml": ("baichuan2", 4096, 32, 32, 32, 128, 125696),
}


@pytest.mark.parametrize("path", REAL_SIZES)
def test_shipped_family_configs_hold_the_models_real_settings(path):
    from mindsft.config import load_run_config
    config = load_run_config(CONFIGS / path).model_config
    family, *shape = REAL_SIZES[path]
    assert config.family == family
    assert [config.hidden_size, config.num_layers, config.num_heads, config.n_kv_heads, config.head_dim,
            config.vocab_size] == shape
    assert config.qkv_has_bias == (family == "qwen2") and config.qk_norm == (family == "qwen3")
    assert config.norm_head == (family == "baichuan2")
    assert (config.rope_scaling or {}).get("rope_type") == ("llama3" if family == "llama" else None)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "mistral", "baichuan2"])
def test_tiny_cpu_configs_describe_the_demo_model_of_their_family(family):
    from mindsft.config import load_run_config
    from mindsft.demo_model import tiny_config
    config = load_run_config(CONFIGS / family / f"finetune_{family}_tiny_cpu.yaml").model_config
    assert config == tiny_config(family)


# ---- convert_weight.py --model ---------------------------------------------------------------------

def convert_main(argv):
    """Run tools/convert_weight.py's main in this process."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("convert_weight_tool", CONFIGS.parent / "tools" / "convert_weight.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.main(argv)


def test_convert_weight_takes_mindformers_family_names_or_infers_the_family(tmp_path, capsys):
    write_family_folder("qwen2", reference_model("qwen2"), tmp_path / "hf")
    assert convert_main(["--model", "qwen2", "--input_path", str(tmp_path / "hf"),
                         "--output_path", str(tmp_path / "a.ckpt"), "--no_progress"]) == 0
    assert convert_main(["--input_path", str(tmp_path / "hf"), "--output_path", str(tmp_path / "b.ckpt"),
                         "--no_progress"]) == 0
    assert json.loads((tmp_path / "b.config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert convert_main(["--model", "mistral", "--input_path", str(tmp_path / "hf"),
                         "--output_path", str(tmp_path / "c.ckpt"), "--no_progress"]) == 1
    assert "--model mistral but the config describes a qwen2 model" in capsys.readouterr().err
    assert not (tmp_path / "c.ckpt").exists()
    assert convert_main(["--reversed", "--model", "qwen2", "--input_path", str(tmp_path / "b.ckpt"),
                         "--output_path", str(tmp_path / "back"), "--no_progress"]) == 0
    assert sorted(load_file(tmp_path / "back" / "model.safetensors")) == \
        sorted(load_file(tmp_path / "hf" / "model.safetensors"))


def test_qwen_weights_in_a_llama_config_name_the_flag_to_set():
    from mindsft.errors import ConvertError
    from mindsft.loading import assign_weights
    from mindsft.models.llama import LlamaForCausalLM
    import dataclasses
    reference = reference_model("qwen3")
    config = twin("qwen3", reference).config
    model = LlamaForCausalLM(dataclasses.replace(config, qk_norm=False))
    arrays = reference_arrays_as_ours(hf_files("qwen3", reference)[1], config)
    with pytest.raises(ConvertError, match="attention.q_norm.weight.*q/k norm tensors: set qk_norm: True"):
        assign_weights(model, arrays, source="qwen3.ckpt")


def test_mistral_window_in_cached_decoding_equals_recomputing_the_left_padded_batch():
    reference = reference_model("mistral_window_7", scale=6.0)
    generator = Generator(twin("mistral_window_7", reference))
    rng = np.random.RandomState(2)
    prompts = [rng.randint(3, reference.config.vocab_size, n).tolist() for n in (4, 13)]
    config = GenerationConfig(max_new_tokens=16, eos_token_id=10**6)
    cached = generator.generate(prompts, config, use_cache=True).sequences
    assert cached == generator.generate(prompts, config, use_cache=False).sequences


@pytest.mark.parametrize("family", ["llama3", "qwen3", "mistral", "baichuan2"])
def test_demo_model_of_a_family_loads_in_transformers_with_its_kind_of_tokenizer(family, tmp_path):
    from mindsft.demo_model import write_tiny_hf_llama
    from mindsft.tokenizer import load_tokenizer
    config = write_tiny_hf_llama(tmp_path / "hf", family=family)
    files = sorted(os.listdir(tmp_path / "hf"))
    assert ("tokenizer.model" in files) == (family == "baichuan2")
    if family == "baichuan2":
        return  # its modeling and tokenizer code ship with the real model, not with transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.model_type == {"llama3": "llama"}.get(family, family)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_tokenizer(tmp_path / "hf")
    text = "Give three tips for staying healthy."
    assert ours.encode(text, add_bos=ours.adds_bos) == reference(text)["input_ids"]
    assert (ours.eos_id, ours.pad_id) == (config.eos_token_id, config.pad_token_id)


@pytest.mark.parametrize("family", ["qwen3", "mistral_window_7", "baichuan2"])
def test_packed_rows_give_each_sample_the_logits_it_has_alone(family):
    reference = reference_model(family)
    ours = twin(family, reference)
    rng = np.random.RandomState(3)
    samples = [rng.randint(3, reference.config.vocab_size, n).astype(np.int32) for n in (11, 5, 9)]
    row = np.concatenate(samples + [np.zeros(3, np.int32)]).reshape(1, -1)
    ends = np.cumsum([len(s) for s in samples]).astype(np.int32).reshape(1, -1)
    packed = ours(ms.Tensor(row), actual_seq_len=ms.Tensor(ends)).asnumpy()[0]
    start = 0
    for sample in samples:
        alone = ours(ms.Tensor(sample.reshape(1, -1))).asnumpy()[0]
        assert np.abs(packed[start:start + len(sample)] - alone).max() <= 1e-5
        start += len(sample)
