"""The model's settings: one dataclass for every Llama-family model (variants are flags the one
network in `models/llama.py` reads), built from MindFormers' `model.model_config`.

Pure Python (no MindSpore import), so the converter and the config loader stay light.
HuggingFace's `config.json` is read and written by each family's module (`models/families/`).
"""
import dataclasses
from typing import Optional

from mindsft.data.schema import IGNORE_INDEX
from mindsft.errors import ConfigError
from mindsft.typed import build

# MindFormers spells dtypes several ways in its YAML files.
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "float32": "float32",
                 "float16": "float16", "bfloat16": "bfloat16"}
# The keys without which a model has no shape: a config that lacks one is completed from the
# checkpoint's own config file or refused (never a default 7B model).
SHAPE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads")


def canonical_dtype(name, what="dtype"):
    key = str(name).lower().replace("mstype.", "").replace("torch.", "")
    if key not in DTYPE_ALIASES:
        raise ConfigError(f"{what} {name!r} is not one of float32, float16, bfloat16")
    return DTYPE_ALIASES[key]


@dataclasses.dataclass
class LlamaConfig:
    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    intermediate_size: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 4096
    seq_length: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    ignore_index: int = IGNORE_INDEX
    compute_dtype: str = "float32"
    param_init_type: str = "float32"
    initializer_range: float = 0.02
    # Family flags (see models/families/): biases on q/k/v (Qwen2), RMSNorm of each query and key
    # head (Qwen3), attention only over the last `sliding_window` tokens (Mistral), output rows
    # normalised in the forward pass (Baichuan2's NormHead).
    qkv_has_bias: bool = False
    qk_norm: bool = False
    sliding_window: Optional[int] = None
    norm_head: bool = False

    def __post_init__(self):
        for key in SHAPE_KEYS + ("seq_length", "max_position_embeddings"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model_config.{key} must be at least 1, got {getattr(self, key)}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"model_config.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.ignore_index != IGNORE_INDEX:
            raise ConfigError(f"model_config.ignore_token_id {self.ignore_index}: the data is written with "
                              f"{IGNORE_INDEX} for tokens not learned; leave it at {IGNORE_INDEX}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.n_kv_heads < 1 or self.num_heads % self.n_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.intermediate_size is None:
            self.intermediate_size = ffn_size_from_multiple_of(self.hidden_size, self.multiple_of,
                                                               self.ffn_dim_multiplier)
        self.compute_dtype = canonical_dtype(self.compute_dtype, "compute_dtype")
        self.param_init_type = canonical_dtype(self.param_init_type, "param_init_type")
        if self.rope_scaling is not None:
            self.rope_scaling = normalize_rope_scaling(self.rope_scaling)
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"model_config.sliding_window must be at least 1 (or null), got {self.sliding_window}")
        if self.norm_head and self.tie_word_embeddings:
            raise ConfigError("model_config.norm_head normalises the output head's own rows: it cannot be "
                              "combined with tie_word_embeddings")

    # MindFormers' model_config keys that are about speed or placement, not about what is computed
    # (accepted so a MindFormers YAML reads unchanged; config.no_effect_settings reports them).
    MINDFORMERS_IGNORED_KEYS = frozenset({
        "type", "batch_size", "layernorm_compute_type", "softmax_compute_type", "rotary_dtype",
        "use_flash_attention", "use_past", "offset", "checkpoint_name_or_path", "repetition_penalty",
        "max_decode_length", "top_k", "top_p", "do_sample", "use_paged_attention", "block_size",
        "num_blocks", "fine_grain_interleave", "qkv_concat", "use_rope_slice", "use_past_shard",
        "is_dynamic", "scaling_factor", "extend_method", "parallel_optimizer", "fused_rms_norm",
        "embedding_init_type", "pp_interleave_num", "use_ring_attention",
        "output_attentions", "output_hidden_states", "return_dict",
        # Qwen's keys that MindFormers' research Qwen2.5 YAMLs carry into a LlamaConfig, which
        # swallows them unread (its rope base is `theta`): no effect in MindFormers either.
        "emb_dropout_prob", "rotary_pct", "rotary_emb_base",
    })
    # MindFormers name -> our field name.
    MINDFORMERS_RENAMES = {"theta": "rope_theta", "ignore_token_id": "ignore_index",
                           "max_position_embedding": "max_position_embeddings",
                           "qk_layernorm": "qk_norm", "use_qk_norm": "qk_norm"}

    @classmethod
    def field_names(cls):
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mindformers(cls, model_config, where="model_config"):
        """Build from a MindFormers `model.model_config` mapping (pet_config excluded).

        Values are coerced to their types; unknown keys are errors naming the nearest one.
        """
        model_config = dict(model_config)
        if model_config.get("extend_method") in ("LINEAR", "linear") and "rope_scaling" not in model_config:
            model_config["rope_scaling"] = {"rope_type": "linear",
                                            "factor": float(model_config.get("scaling_factor", 1.0))}
        if model_config.get("max_position_embeddings") is None and model_config.get("max_position_embedding") is None \
                and model_config.get("seq_length") is not None:
            model_config["max_position_embeddings"] = model_config["seq_length"]
        model_config = {k: v for k, v in model_config.items() if v is not None or k in ("n_kv_heads", "head_dim")}
        return build(cls, model_config, where, renames=cls.MINDFORMERS_RENAMES, ignored=cls.MINDFORMERS_IGNORED_KEYS)


def ffn_size_from_multiple_of(hidden_size, multiple_of, ffn_dim_multiplier=None):
    """MindFormers' (and Meta's) FFN width: 2/3 of 4·hidden, scaled, rounded up to multiple_of."""
    hidden_dim = int(2 * (4 * hidden_size) / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


def normalize_rope_scaling(rope_scaling):
    if not isinstance(rope_scaling, dict):
        raise ConfigError(f"rope_scaling must be a mapping such as {{rope_type: llama3, factor: 8.0}}, "
                          f"got {rope_scaling!r}")
    scaling = dict(rope_scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type not in ("default", "linear", "llama3"):
        raise ConfigError(f"rope_scaling type {rope_type!r} is not supported (linear, llama3)")
    if rope_type == "default":
        return None
    if "factor" not in scaling:
        raise ConfigError(f"rope_scaling {rope_type}: 'factor' is missing")
    scaling["rope_type"] = rope_type
    return scaling
