"""Baichuan2 (7B): HuggingFace `BaichuanForCausalLM` (model_type baichuan, its own modeling code
shipped beside the weights) ⇄ MindFormers' names.

Llama's network with two differences in the files: `self_attn.W_pack` is q, k and v stacked in
one [3·hidden, hidden] tensor (split into wq, wk, wv on the way in, stacked on the way out, both
streaming), and the output head is a NormHead whose rows are normalised in the forward pass.
Baichuan 1 (`BaiChuanForCausalLM`) is the same without the NormHead. The 13B models use ALiBi
instead of rotary positions and are refused.
"""
from mindsft.errors import ConfigError
from mindsft.models.families import llama
from mindsft.models.families.base import Family, entries_from_table

BAICHUAN1_ARCHITECTURE = "BaiChuanForCausalLM"


def weight_table(config):
    hidden, q_out, kv_out = config.hidden_size, config.num_heads * config.head_dim, config.n_kv_heads * config.head_dim
    ffn, vocab = config.intermediate_size, config.vocab_size
    return [
        ("model.embed_tokens.weight", "model.tok_embeddings.embedding_weight", (vocab, hidden)),
        ("model.layers.{i}.self_attn.W_pack.weight",
         ("model.layers.{i}.attention.wq.weight", "model.layers.{i}.attention.wk.weight",
          "model.layers.{i}.attention.wv.weight"),
         ((q_out, hidden), (kv_out, hidden), (kv_out, hidden))),
        ("model.layers.{i}.self_attn.o_proj.weight", "model.layers.{i}.attention.wo.weight", (hidden, q_out)),
        ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.feed_forward.w1.weight", (ffn, hidden)),
        ("model.layers.{i}.mlp.down_proj.weight", "model.layers.{i}.feed_forward.w2.weight", (hidden, ffn)),
        ("model.layers.{i}.mlp.up_proj.weight", "model.layers.{i}.feed_forward.w3.weight", (ffn, hidden)),
        ("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.attention_norm.weight", (hidden,)),
        ("model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.ffn_norm.weight", (hidden,)),
        ("model.norm.weight", "model.norm_out.weight", (hidden,)),
        ("lm_head.weight", "lm_head.weight", (vocab, hidden)),
    ]


def weight_entries(config):
    return entries_from_table(weight_table(config), config)


def config_from_hf(hf_config, source="config.json"):
    if not isinstance(hf_config, dict):
        raise ConfigError(f"{source}: expected a JSON object of settings")
    if hf_config.get("num_hidden_layers") == 40 and hf_config.get("hidden_size") == 5120:
        raise ConfigError(f"{source}: a Baichuan 13B model: it uses ALiBi positions, which mindsft does not "
                          "support (Baichuan2 7B and Baichuan 7B are supported)")
    # Baichuan's modeling code has no setting for these: its rotation base is fixed at 10000,
    # every head has its own keys and values.
    for key, fixed in (("num_key_value_heads", hf_config.get("num_attention_heads")), ("rope_theta", 10000.0)):
        if hf_config.get(key) not in (None, fixed):
            raise ConfigError(f"{source}: {key} {hf_config[key]!r}: Baichuan's model code fixes it at {fixed}")
    if hf_config.get("tie_word_embeddings"):
        raise ConfigError(f"{source}: tie_word_embeddings=true: Baichuan's model has its own output head")
    baichuan1 = BAICHUAN1_ARCHITECTURE in (hf_config.get("architectures") or [])
    return llama.llama_config_from_hf(hf_config, source, family="baichuan2", norm_head=not baichuan1)


def config_to_hf(config, dtype=None):
    """Baichuan2-7B's config.json layout (its modeling code reads no head_dim, kv heads or rope theta)."""
    if config.n_kv_heads != config.num_heads or config.head_dim * config.num_heads != config.hidden_size \
            or config.rope_theta != 10000.0 or config.rope_scaling or config.tie_word_embeddings:
        raise ConfigError("a Baichuan model has one key/value head per head, head_dim = hidden/heads, rope theta "
                          "10000 without scaling and an untied head; this config differs")
    return {
        "architectures": ["BaichuanForCausalLM" if config.norm_head else BAICHUAN1_ARCHITECTURE],
        "model_type": "baichuan",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "model_max_length": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "initializer_range": config.initializer_range,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": False,
        "z_loss_weight": 0,
        "torch_dtype": dtype or config.param_init_type,
        "use_cache": True,
    }


FAMILY = Family(
    name="baichuan2",
    mindformers_names=("baichuan2", "baichuan"),
    arch_types=("Baichuan7BV2ForCausalLM", "BaichuanForCausalLM"),
    hf_architectures=("BaichuanForCausalLM", BAICHUAN1_ARCHITECTURE),
    hf_model_types=("baichuan",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    weight_entries=weight_entries,
    hf_ignored=llama.hf_ignored,
    lora_projections={"W_pack": ("w_qkv",), "o_proj": ("wo",), "gate_proj": ("w1",), "down_proj": ("w2",),
                      "up_proj": ("w3",)},
    model_flags={"norm_head": True},
    lora_packs={"w_qkv": ("wq", "wk", "wv")},
    packed_renames=(("model.layers.{i}.self_attn.W_pack.weight", "model.layers.{i}.attention.w_qkv.weight"),),
)
