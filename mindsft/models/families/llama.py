"""Llama (1, 2, 3.x): HuggingFace `LlamaForCausalLM` ⇄ MindFormers' Llama names.

Plain renames: both sides store linear weights as [out, in], and HuggingFace's q/k weights are
already in the half-split rotary layout the network uses, so no tensor is transposed or permuted.
"""
import re

from mindsft.errors import ConfigError
from mindsft.models.config import LlamaConfig, canonical_dtype
from mindsft.models.families.base import Family, entries_from_table
from mindsft.typed import coerce

# HuggingFace buffers that are recomputed, never weights (Baichuan's files also hold its caches).
_HF_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.(inv_freq|cos_cached|sin_cached)$"
                         r"|^model\.rotary_emb\.inv_freq$")


def hf_ignored(name):
    return bool(_HF_IGNORED.match(name))


def weight_table(config):
    """[(HF name, our name, shape)] with `{i}` the layer index; the family flags of `config`
    (q/k/v biases, q/k norms, tied head) add or drop rows."""
    hidden, q_out, kv_out = config.hidden_size, config.num_heads * config.head_dim, config.n_kv_heads * config.head_dim
    ffn, vocab = config.intermediate_size, config.vocab_size
    table = [
        ("model.embed_tokens.weight", "model.tok_embeddings.embedding_weight", (vocab, hidden)),
        ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.attention.wq.weight", (q_out, hidden)),
        ("model.layers.{i}.self_attn.k_proj.weight", "model.layers.{i}.attention.wk.weight", (kv_out, hidden)),
        ("model.layers.{i}.self_attn.v_proj.weight", "model.layers.{i}.attention.wv.weight", (kv_out, hidden)),
        ("model.layers.{i}.self_attn.o_proj.weight", "model.layers.{i}.attention.wo.weight", (hidden, q_out)),
        ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.feed_forward.w1.weight", (ffn, hidden)),
        ("model.layers.{i}.mlp.down_proj.weight", "model.layers.{i}.feed_forward.w2.weight", (hidden, ffn)),
        ("model.layers.{i}.mlp.up_proj.weight", "model.layers.{i}.feed_forward.w3.weight", (ffn, hidden)),
        ("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.attention_norm.weight", (hidden,)),
        ("model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.ffn_norm.weight", (hidden,)),
        ("model.norm.weight", "model.norm_out.weight", (hidden,)),
    ]
    if config.qkv_has_bias:
        table[2:2] = [("model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.attention.wq.bias", (q_out,)),
                      ("model.layers.{i}.self_attn.k_proj.bias", "model.layers.{i}.attention.wk.bias", (kv_out,)),
                      ("model.layers.{i}.self_attn.v_proj.bias", "model.layers.{i}.attention.wv.bias", (kv_out,))]
    if config.qk_norm:
        at = next(n for n, row in enumerate(table) if "o_proj" in row[0]) + 1
        table[at:at] = [("model.layers.{i}.self_attn.q_norm.weight", "model.layers.{i}.attention.q_norm.weight",
                         (config.head_dim,)),
                        ("model.layers.{i}.self_attn.k_norm.weight", "model.layers.{i}.attention.k_norm.weight",
                         (config.head_dim,))]
    if not config.tie_word_embeddings:
        table.append(("lm_head.weight", "lm_head.weight", (vocab, hidden)))
    return table


def weight_entries(config):
    return entries_from_table(weight_table(config), config)


def hf_value(hf_config, key, tp, source, default=...):
    """hf_config[key] as type `tp`, or one line naming the file and key."""
    if key not in hf_config or hf_config[key] is None:
        if default is ...:
            raise ConfigError(f"{source}: key {key!r} is missing")
        return default
    return coerce(hf_config[key], tp, f"{source}: {key}")


def llama_config_from_hf(hf_config, source="config.json", family="llama", allowed=(), **flags):
    """LlamaConfig from a HuggingFace config mapping (transformers 4 or 5 layout); `flags` are
    the family's own LlamaConfig settings, `allowed` the HF keys its reader has already checked."""
    if not isinstance(hf_config, dict):
        raise ConfigError(f"{source}: expected a JSON object of settings")
    rope = hf_config.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{source}: rope_parameters must be an object")
    rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    rope_scaling = hf_config.get("rope_scaling")
    if rope.get("rope_type", "default") != "default":
        rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {hf_config['hidden_act']!r} is not supported (silu only)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf_config.get(flag) and flag not in allowed:
            raise ConfigError(f"{source}: {flag}=true is not supported by the {family} family")
    dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    eos = hf_config.get("eos_token_id", 2)
    max_positions = hf_value(hf_config, "max_position_embeddings", int, source, 4096)
    return LlamaConfig(
        family=family,
        vocab_size=hf_value(hf_config, "vocab_size", int, source),
        hidden_size=hf_value(hf_config, "hidden_size", int, source),
        num_layers=hf_value(hf_config, "num_hidden_layers", int, source),
        num_heads=hf_value(hf_config, "num_attention_heads", int, source),
        n_kv_heads=hf_value(hf_config, "num_key_value_heads", int, source, None),
        head_dim=hf_value(hf_config, "head_dim", int, source, None),
        intermediate_size=hf_value(hf_config, "intermediate_size", int, source),
        rms_norm_eps=hf_value(hf_config, "rms_norm_eps", float, source, 1e-6),
        rope_theta=coerce(rope_theta, float, f"{source}: rope_theta"),
        rope_scaling=rope_scaling,
        max_position_embeddings=max_positions,
        seq_length=max_positions,
        tie_word_embeddings=hf_value(hf_config, "tie_word_embeddings", bool, source, False),
        bos_token_id=hf_value(hf_config, "bos_token_id", int, source, 1),
        eos_token_id=coerce(eos[0] if isinstance(eos, list) and eos else eos, int, f"{source}: eos_token_id"),
        pad_token_id=hf_value(hf_config, "pad_token_id", int, source, 0),
        param_init_type=canonical_dtype(dtype),
        compute_dtype=canonical_dtype(dtype),
        initializer_range=hf_value(hf_config, "initializer_range", float, source, 0.02),
        **flags,
    )


def llama_config_to_hf(config, dtype=None, architecture="LlamaForCausalLM", model_type="llama"):
    """The `config.json` mapping (transformers 4 layout, which transformers 5 also reads)."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": config.initializer_range,
        "torch_dtype": dtype or config.param_init_type,
        "use_cache": True,
    }


# PEFT's target_modules names of the projections -> our cells.
LORA_PROJECTIONS = {"q_proj": ("wq",), "k_proj": ("wk",), "v_proj": ("wv",), "o_proj": ("wo",),
                    "gate_proj": ("w1",), "down_proj": ("w2",), "up_proj": ("w3",)}

FAMILY = Family(
    name="llama",
    mindformers_names=("llama", "llama2", "llama3"),
    arch_types=("LlamaForCausalLM",),
    hf_architectures=("LlamaForCausalLM", "LlamaModel"),
    hf_model_types=("llama",),
    config_from_hf=llama_config_from_hf,
    config_to_hf=lambda config, dtype=None: llama_config_to_hf(config, dtype),
    weight_entries=weight_entries,
    hf_ignored=hf_ignored,
    lora_projections=LORA_PROJECTIONS,
)
