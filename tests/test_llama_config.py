"""LlamaConfig is built from MindFormers' model_config and from HuggingFace config.json."""
import json

import pytest

from conftest import shared_file
from mindsft.errors import ConfigError
from mindsft.models.config import LlamaConfig, ffn_size_from_multiple_of
from mindsft.models.families import hf_config_of, model_config_from_hf


def test_mindformers_7b_model_config_gives_ffn_11008():
    config = LlamaConfig.from_mindformers(dict(
        type="LlamaConfig", seq_length=4096, hidden_size=4096, num_layers=32, num_heads=32,
        vocab_size=32000, multiple_of=256, rms_norm_eps=1e-5, theta=10000, n_kv_heads=None,
        ignore_token_id=-100, compute_dtype="bfloat16", use_flash_attention=True))
    assert config.intermediate_size == 11008
    assert config.n_kv_heads == 32 and config.head_dim == 128
    assert config.compute_dtype == "bfloat16" and config.ignore_index == -100


def test_ffn_dim_multiplier_as_llama3_70b():
    assert ffn_size_from_multiple_of(8192, 4096, 1.3) == 28672


def test_unknown_model_config_key_suggests_nearest():
    with pytest.raises(ConfigError, match="num_layer.*did you mean 'num_layers'"):
        LlamaConfig.from_mindformers(dict(num_layer=2))


def test_transformers_5_config_with_rope_parameters():
    config = model_config_from_hf(json.loads(shared_file("models/tiny-random-llama-2-hf/config.json").read_text()))
    assert (config.hidden_size, config.num_layers, config.num_heads, config.head_dim) == (8, 1, 2, 4)
    assert config.rope_theta == 10000.0 and config.rope_scaling is None


def test_transformers_5_llama3_rope_parameters_are_read():
    config = model_config_from_hf(dict(
        model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, rope_parameters={"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 8192}))
    assert config.rope_theta == 500000.0
    assert config.rope_scaling["rope_type"] == "llama3" and config.rope_scaling["factor"] == 8.0


def test_non_llama_architecture_is_refused():
    with pytest.raises(ConfigError, match="not a Llama-family model"):
        model_config_from_hf(dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=1))


def test_hf_config_round_trip():
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, n_kv_heads=2,
                         intermediate_size=48, tie_word_embeddings=True)
    again = model_config_from_hf(hf_config_of(config))
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "n_kv_heads", "intermediate_size",
                  "tie_word_embeddings", "rope_theta", "head_dim"):
        assert getattr(again, field) == getattr(config, field)
