"""The shape every Llama weight must have, from a `LlamaConfig` or straight from `config.json`.

The forward converter reads `config.json` here rather than through `LlamaConfig` because
importing `mindsft.models.llama` imports MindSpore, whose import alone costs ~480 MB of RSS:
as much as the converter's whole memory budget. tests/test_convert_shapes.py checks that both
readings agree with the model's own parameters.
"""
import types

from mindsft.convert.names import expected_ms_names
from mindsft.errors import ConvertError

LLAMA_ARCHITECTURES = {"LlamaForCausalLM", "LlamaModel"}


def llama_dims_from_hf(hf_config, source="config.json"):
    """The dimensions that fix the weight shapes, read from a HuggingFace config mapping."""
    archs = hf_config.get("architectures") or []
    model_type = hf_config.get("model_type")
    if model_type not in (None, "llama") or (archs and not set(archs) & LLAMA_ARCHITECTURES):
        raise ConvertError(f"{source}: model_type {model_type!r} / architectures {archs} is not a Llama-family "
                           "model (expected model_type 'llama', LlamaForCausalLM)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf_config.get(flag):
            raise ConvertError(f"{source}: {flag}=true is not supported by the Llama model")
    try:
        hidden, heads = int(hf_config["hidden_size"]), int(hf_config["num_attention_heads"])
        return types.SimpleNamespace(
            vocab_size=int(hf_config["vocab_size"]), hidden_size=hidden,
            num_layers=int(hf_config["num_hidden_layers"]), num_heads=heads,
            n_kv_heads=int(hf_config.get("num_key_value_heads") or heads),
            head_dim=int(hf_config.get("head_dim") or hidden // heads),
            intermediate_size=int(hf_config["intermediate_size"]),
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise ConvertError(f"{source}: key {e.args[0]!r} is missing") from None


def weight_shapes(config):
    """{MindFormers name: shape} for a LlamaConfig (or llama_dims_from_hf's result), in model order."""
    q_out = config.num_heads * config.head_dim
    kv_out = config.n_kv_heads * config.head_dim
    by_leaf = {
        "embedding_weight": (config.vocab_size, config.hidden_size),
        "wq": (q_out, config.hidden_size), "wk": (kv_out, config.hidden_size),
        "wv": (kv_out, config.hidden_size), "wo": (config.hidden_size, q_out),
        "w1": (config.intermediate_size, config.hidden_size),
        "w3": (config.intermediate_size, config.hidden_size),
        "w2": (config.hidden_size, config.intermediate_size),
        "lm_head": (config.vocab_size, config.hidden_size),
    }
    shapes = {}
    for name in expected_ms_names(config.num_layers, config.tie_word_embeddings):
        parts = name.split(".")
        leaf = parts[-2] if parts[-1] == "weight" else parts[-1]
        shapes[name] = (config.hidden_size,) if "norm" in name else by_leaf[leaf]
    return shapes
