"""The Llama-family decoder, top to bottom: config, RMSNorm, rotary embedding, attention with
grouped key/value heads, SwiGLU MLP, decoder layer, model, causal-LM head and its loss.

It computes what HuggingFace transformers' `LlamaForCausalLM` computes on the same weights,
and its parameter names are MindFormers' Llama names so checkpoints interoperate.
"""
import dataclasses
import difflib
import math
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, One, initializer

from mindsft.errors import ConfigError
from mindsft.models.cpu_kernels import causal_attention, cross_entropy, packed_attention

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
# MindFormers spells dtypes several ways in its YAML files.
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "float32": "float32",
                 "float16": "float16", "bfloat16": "bfloat16"}
LLAMA_ARCHITECTURES = {"LlamaForCausalLM", "LlamaModel"}


def canonical_dtype(name, what="dtype"):
    key = str(name).lower().replace("mstype.", "").replace("torch.", "")
    if key not in DTYPE_ALIASES:
        raise ConfigError(f"{what} {name!r} is not one of float32, float16, bfloat16")
    return DTYPE_ALIASES[key]


@dataclasses.dataclass
class LlamaConfig:
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
    ignore_index: int = -100
    compute_dtype: str = "float32"
    param_init_type: str = "float32"
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.n_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.intermediate_size is None:
            self.intermediate_size = ffn_size_from_multiple_of(self.hidden_size, self.multiple_of,
                                                               self.ffn_dim_multiplier)
        self.compute_dtype = canonical_dtype(self.compute_dtype, "compute_dtype")
        self.param_init_type = canonical_dtype(self.param_init_type, "param_init_type")
        if self.rope_scaling is not None:
            self.rope_scaling = normalize_rope_scaling(self.rope_scaling)

    # MindFormers' model_config keys that are about speed or placement, not about what is computed.
    MINDFORMERS_IGNORED_KEYS = frozenset({
        "type", "batch_size", "layernorm_compute_type", "softmax_compute_type", "rotary_dtype",
        "use_flash_attention", "use_past", "offset", "checkpoint_name_or_path", "repetition_penalty",
        "max_decode_length", "top_k", "top_p", "do_sample", "use_paged_attention", "block_size",
        "num_blocks", "fine_grain_interleave", "qkv_concat", "use_rope_slice", "use_past_shard",
        "is_dynamic", "scaling_factor", "extend_method", "parallel_optimizer", "fused_rms_norm",
        "qkv_has_bias", "embedding_init_type", "pp_interleave_num", "use_ring_attention",
        "pet_config", "output_attentions", "output_hidden_states", "return_dict",
    })
    # MindFormers name -> our field name.
    MINDFORMERS_RENAMES = {"theta": "rope_theta", "ignore_token_id": "ignore_index",
                           "max_position_embedding": "max_position_embeddings"}

    @classmethod
    def field_names(cls):
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mindformers(cls, model_config):
        """Build from a MindFormers `model.model_config` mapping. Unknown keys are errors."""
        known = set(cls.field_names())
        kwargs = {}
        for key, value in dict(model_config).items():
            name = cls.MINDFORMERS_RENAMES.get(key, key)
            if name in known:
                kwargs[name] = value
            elif key not in cls.MINDFORMERS_IGNORED_KEYS:
                choices = sorted(known | set(cls.MINDFORMERS_RENAMES) | cls.MINDFORMERS_IGNORED_KEYS)
                near = difflib.get_close_matches(key, choices, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"model_config: unknown key {key!r}{hint}")
        if model_config.get("extend_method") in ("LINEAR", "linear") and "rope_scaling" not in kwargs:
            kwargs["rope_scaling"] = {"rope_type": "linear", "factor": float(model_config.get("scaling_factor", 1.0))}
        if kwargs.get("max_position_embeddings") is None and kwargs.get("seq_length") is not None:
            kwargs["max_position_embeddings"] = kwargs["seq_length"]
        return cls(**kwargs)

    @classmethod
    def from_hf(cls, hf_config, source="config.json"):
        """Build from a HuggingFace `config.json` mapping (transformers 4 or 5 layout)."""
        archs = hf_config.get("architectures") or []
        model_type = hf_config.get("model_type")
        if model_type not in (None, "llama") or (archs and not set(archs) & LLAMA_ARCHITECTURES):
            raise ConfigError(f"{source}: model_type {model_type!r} / architectures {archs} is not a "
                              "Llama-family model (expected model_type 'llama', LlamaForCausalLM)")
        rope = hf_config.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
        rope_scaling = hf_config.get("rope_scaling")
        if rope.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if hf_config.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {hf_config['hidden_act']!r} is not supported (silu only)")
        for flag in ("attention_bias", "mlp_bias"):
            if hf_config.get(flag):
                raise ConfigError(f"{source}: {flag}=true is not supported by the Llama model")
        dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
        eos = hf_config.get("eos_token_id", 2)
        return cls(
            vocab_size=hf_config["vocab_size"],
            hidden_size=hf_config["hidden_size"],
            num_layers=hf_config["num_hidden_layers"],
            num_heads=hf_config["num_attention_heads"],
            n_kv_heads=hf_config.get("num_key_value_heads"),
            head_dim=hf_config.get("head_dim"),
            intermediate_size=hf_config["intermediate_size"],
            rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=hf_config.get("max_position_embeddings", 4096),
            seq_length=hf_config.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            bos_token_id=hf_config.get("bos_token_id", 1),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            pad_token_id=hf_config.get("pad_token_id") or 0,
            param_init_type=canonical_dtype(dtype),
            compute_dtype=canonical_dtype(dtype),
            initializer_range=hf_config.get("initializer_range", 0.02),
        )

    def to_hf(self, dtype=None):
        """The `config.json` mapping (transformers 4 layout, which transformers 5 also reads)."""
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "attention_bias": False,
            "mlp_bias": False,
            "initializer_range": self.initializer_range,
            "torch_dtype": dtype or self.param_init_type,
            "use_cache": True,
        }
        return config


def ffn_size_from_multiple_of(hidden_size, multiple_of, ffn_dim_multiplier=None):
    """MindFormers' (and Meta's) FFN width: 2/3 of 4·hidden, scaled, rounded up to multiple_of."""
    hidden_dim = int(2 * (4 * hidden_size) / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


def normalize_rope_scaling(rope_scaling):
    scaling = dict(rope_scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type not in ("default", "linear", "llama3"):
        raise ConfigError(f"rope_scaling type {rope_type!r} is not supported (linear, llama3)")
    if rope_type == "default":
        return None
    scaling["rope_type"] = rope_type
    return scaling


def rope_inverse_frequencies(config):
    """Per-pair rotation frequencies in float32, as transformers computes them (scaling included)."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = np.float32(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return (inv_freq / factor).astype(np.float32)
    # llama3: long wavelengths slowed by `factor`, short kept, the band between blended.
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rotate_half(x):
    half = x.shape[-1] // 2
    return ops.cat((-x[..., half:], x[..., :half]), -1)


def apply_rotary(x, cos, sin):
    """HuggingFace's half-split layout: pairs are (i, i + head_dim/2), not interleaved."""
    return x * cos + rotate_half(x) * sin


def attention_probs(scores):
    """Softmax over the last axis, as exp(log_softmax): the same values to rounding, and on
    MindSpore's CPU backend its backward measured ~30% faster on [32, 512, 512] scores."""
    return ops.exp(ops.log_softmax(scores, -1))


def packed_segments(actual_seq_len, seq):
    """(sample index, first position of that sample), each [B, S] int32, of every position of
    packed rows whose samples end at the cumulative offsets actual_seq_len [B, K]; positions
    past the last offset form one more sample (the padding)."""
    batch, count = actual_seq_len.shape
    # Full shapes, not [1, ...] broadcasts: graph-mode compile on CPU trips over those.
    ends = ops.broadcast_to(actual_seq_len.astype(ms.int32).reshape(batch, count, 1), (batch, count, seq))
    positions = ops.broadcast_to(ops.arange(0, seq, dtype=ms.int32).reshape(1, 1, seq), (batch, count, seq))
    passed = ends <= positions
    sample = passed.astype(ms.int32).sum(1).astype(ms.int32)
    start = ops.amax(ops.select(passed, ends, ops.zeros_like(ends)), 1)
    return sample, start


class Linear(nn.Cell):
    """y = x · Wᵀ with W stored [out, in] (as HuggingFace and MindFormers store it), no bias."""

    def __init__(self, in_features, out_features, config):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = DTYPES[config.compute_dtype]
        self.weight = Parameter(initializer(Normal(config.initializer_range), [out_features, in_features],
                                            DTYPES[config.param_init_type]), name="weight")
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        out_shape = x.shape[:-1] + (self.out_features,)
        x = ops.reshape(x.astype(self.compute_dtype), (-1, self.in_features))
        y = self.matmul(x, self.weight.astype(self.compute_dtype))
        return ops.reshape(y, out_shape)


class Embedding(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.compute_dtype = DTYPES[config.compute_dtype]
        self.embedding_weight = Parameter(
            initializer(Normal(config.initializer_range), [config.vocab_size, config.hidden_size],
                        DTYPES[config.param_init_type]), name="embedding_weight")

    def construct(self, input_ids):
        return ops.gather(self.embedding_weight, input_ids, 0).astype(self.compute_dtype)


class RMSNorm(nn.Cell):
    """Normalized in float32 whatever the compute dtype, as transformers and MindFormers do."""

    def __init__(self, dim, eps, config):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(initializer(One(), [dim], DTYPES[config.param_init_type]), name="weight")

    def construct(self, x):
        input_dtype = x.dtype
        x32 = x.astype(ms.float32)
        variance = ops.mean(x32 * x32, -1, keep_dims=True)
        normed = (x32 * ops.rsqrt(variance + self.eps)).astype(input_dtype)
        return self.weight.astype(input_dtype) * normed


class Attention(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.n_rep = config.num_heads // config.n_kv_heads
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.compute_dtype = DTYPES[config.compute_dtype]
        q_size, kv_size = config.num_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.wq = Linear(config.hidden_size, q_size, config)
        self.wk = Linear(config.hidden_size, kv_size, config)
        self.wv = Linear(config.hidden_size, kv_size, config)
        self.wo = Linear(q_size, config.hidden_size, config)
        # The fused causal kernel (CPU, fp32); None elsewhere, and then MindSpore's own ops run.
        self.fused_causal = causal_attention(config.head_dim) if self.compute_dtype == ms.float32 else None
        # Its packed-row form. On Ascend the same offsets would go to FlashAttentionScore's
        # actual_seq_qlen/kvlen (TND layout); that is not built (it cannot run here), and the
        # additive block-diagonal mask below serves every device.
        self.fused_packed = packed_attention(config.head_dim) if self.fused_causal is not None else None

    def rotated_qkv(self, x, cos, sin):
        """Queries (rotated, pre-scaled by 1/sqrt(head_dim)), keys (rotated), values: [B, heads, S, head_dim]."""
        batch, seq = x.shape[0], x.shape[1]
        q = self.wq(x).reshape(batch, seq, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.wk(x).reshape(batch, seq, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.wv(x).reshape(batch, seq, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        cos = ops.expand_dims(cos, 1)
        sin = ops.expand_dims(sin, 1)
        return apply_rotary(q, cos, sin) * self.scale, apply_rotary(k, cos, sin), v

    def construct(self, x, cos, sin, mask, seq_ends=None):
        """x [B, S, hidden]; cos/sin [B, S, head_dim]; mask additive [B, 1, S, S] in float32, or
        None for causal attention through the fused kernel, within each packed sample when
        seq_ends [B, K] (actual_seq_len) is given."""
        batch, seq = x.shape[0], x.shape[1]
        q, k, v = self.rotated_qkv(x, cos, sin)
        if mask is None:
            if seq_ends is None:
                out, _ = self.fused_causal(q, k, v)
            else:
                out, _ = self.fused_packed(q, k, v, seq_ends.astype(ms.int32))
            return self.wo(out.transpose(0, 2, 1, 3).reshape(batch, seq, self.num_heads * self.head_dim))
        if self.n_rep > 1:
            k = ops.repeat_interleave(k, self.n_rep, 1)
            v = ops.repeat_interleave(v, self.n_rep, 1)
        scores = ops.matmul(q, k.transpose(0, 1, 3, 2)).astype(ms.float32) + mask
        probs = attention_probs(scores).astype(self.compute_dtype)
        out = ops.matmul(probs, v).transpose(0, 2, 1, 3).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.wo(out)

    def construct_cached(self, x, cos, sin, mask, write_weight, keep_weight, key_cache, value_cache):
        """Write x's keys/values into the cache, then attend from x's tokens over the whole cache.

        key/value_cache [B, kv_heads, T, head_dim]; write_weight [T, S] one-hot (slot of each new
        token) and keep_weight [T, 1] (0 where a slot is overwritten): a one-hot product moves
        values exactly and keeps shapes static, so a decode step compiles once. mask [B, 1, S, T].
        """
        batch, seq = x.shape[0], x.shape[1]
        cache_len = key_cache.shape[2]
        q, k, v = self.rotated_qkv(x, cos, sin)
        key_cache = key_cache * keep_weight + ops.matmul(write_weight, k)
        value_cache = value_cache * keep_weight + ops.matmul(write_weight, v)
        # Query heads grouped under their key/value head instead of repeating the cache n_rep times.
        grouped_q = q.reshape(batch, self.n_kv_heads, self.n_rep * seq, self.head_dim)
        scores = ops.matmul(grouped_q, key_cache.transpose(0, 1, 3, 2)).astype(ms.float32)
        scores = scores.reshape(batch, self.num_heads, seq, cache_len) + mask
        probs = attention_probs(scores).astype(self.compute_dtype)
        probs = probs.reshape(batch, self.n_kv_heads, self.n_rep * seq, cache_len)
        out = ops.matmul(probs, value_cache).reshape(batch, self.num_heads, seq, self.head_dim)
        out = out.transpose(0, 2, 1, 3).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.wo(out), key_cache, value_cache


class FeedForward(nn.Cell):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 = gate, w2 = down, w3 = up (MindFormers' names)."""

    def __init__(self, config):
        super().__init__()
        self.w1 = Linear(config.hidden_size, config.intermediate_size, config)
        self.w2 = Linear(config.intermediate_size, config.hidden_size, config)
        self.w3 = Linear(config.hidden_size, config.intermediate_size, config)

    def construct(self, x):
        return self.w2(ops.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
        self.feed_forward = FeedForward(config)

    def construct(self, x, cos, sin, mask, seq_ends=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, seq_ends)
        return h + self.feed_forward(self.ffn_norm(h))

    def construct_cached(self, x, cos, sin, mask, write_weight, keep_weight, key_cache, value_cache):
        attended, key_cache, value_cache = self.attention.construct_cached(
            self.attention_norm(x), cos, sin, mask, write_weight, keep_weight, key_cache, value_cache)
        h = x + attended
        return h + self.feed_forward(self.ffn_norm(h)), key_cache, value_cache


class LlamaModel(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.compute_dtype = DTYPES[config.compute_dtype]
        self.tok_embeddings = Embedding(config)
        self.layers = nn.CellList([DecoderLayer(config) for _ in range(config.num_layers)])
        self.norm_out = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
        self.inv_freq = Tensor(rope_inverse_frequencies(config))
        self.fused_causal = self.layers[0].attention.fused_causal is not None

    def rotary_tables(self, position_ids):
        """cos, sin [B, S, head_dim] in the compute dtype, computed in float32 as transformers does."""
        freqs = ops.expand_dims(position_ids.astype(ms.float32), -1) * self.inv_freq
        emb = ops.cat((freqs, freqs), -1)
        return ops.cos(emb).astype(self.compute_dtype), ops.sin(emb).astype(self.compute_dtype)

    def construct(self, input_ids, attention_mask=None, actual_seq_len=None):
        """input_ids [B, S] int32 → final hidden states [B, S, hidden].

        attention_mask [B, S] (1 = token, 0 = padding), optional: with it, positions count only
        real tokens and padding is never attended, so a left-padded prompt computes what it
        would alone. actual_seq_len [B, K], optional: packed rows, each sample computed as if
        alone (attention within it, positions from 0).
        """
        batch, seq = input_ids.shape
        causal = ops.tril(ops.ones((seq, seq), ms.bool_))
        if actual_seq_len is not None:
            sample, start = packed_segments(actual_seq_len, seq)
            position_ids = ops.broadcast_to(ops.arange(0, seq, dtype=ms.int32).reshape(1, seq), (batch, seq)) - start
            same_sample = sample.reshape(batch, seq, 1) == sample.reshape(batch, 1, seq)
            allowed = ops.logical_and(ops.broadcast_to(causal.reshape(1, 1, seq, seq), (batch, 1, seq, seq)),
                                      same_sample.reshape(batch, 1, seq, seq))
        elif attention_mask is None:
            # One row of positions and one [S, S] mask, broadcast over the batch in the ops that use them.
            position_ids = ops.broadcast_to(ops.arange(0, seq, dtype=ms.int32).reshape(1, seq), (batch, seq))
            allowed = ops.broadcast_to(causal.reshape(1, 1, seq, seq), (batch, 1, seq, seq))
        else:
            keep = attention_mask.astype(ms.int32)
            position_ids = ops.clamp(ops.cumsum(keep, 1) - 1, 0)
            allowed = ops.logical_and(causal.reshape(1, 1, seq, seq), keep.astype(ms.bool_).reshape(batch, 1, 1, seq))
        if attention_mask is None and self.fused_causal:
            mask = None  # plain causal: the fused kernel needs no mask
        else:
            mask = ops.select(allowed, ops.zeros(allowed.shape, ms.float32),
                              ops.full(allowed.shape, -1e30, dtype=ms.float32))
        cos, sin = self.rotary_tables(position_ids)
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, actual_seq_len)
        return self.norm_out(h)

    def construct_cached(self, input_ids, position_ids, cache_mask, query_slots, caches):
        """Run new tokens against a key/value cache: the prompt (prefill) or one token (decode).

        input_ids, position_ids [B, S] int32; cache_mask [B, T] (1 = slot holds a real token,
        the new ones included); query_slots [S] int32, the cache slot of each new token (the same
        for every row: prompts are left-padded); caches: tuple of 2·num_layers tensors
        [B, kv_heads, T, head_dim] (keys, values per layer). Returns (final hidden state of the
        last new token [B, 1, hidden], updated caches).
        """
        batch, seq = input_ids.shape
        cache_len = caches[0].shape[2]
        slots = ops.arange(0, cache_len, dtype=ms.int32).reshape(1, cache_len)
        query_slots = query_slots.reshape(seq, 1)
        causal = slots <= query_slots
        allowed = ops.logical_and(causal.reshape(1, 1, seq, cache_len),
                                  cache_mask.astype(ms.bool_).reshape(batch, 1, 1, cache_len))
        mask = ops.select(allowed, ops.zeros(allowed.shape, ms.float32),
                          ops.full(allowed.shape, -1e30, dtype=ms.float32))
        written = (slots == query_slots).astype(self.compute_dtype)
        write_weight = written.transpose(1, 0)
        keep_weight = 1 - written.sum(0).reshape(cache_len, 1)
        cos, sin = self.rotary_tables(position_ids)
        h = self.tok_embeddings(input_ids)
        new_caches = ()
        for index in range(len(self.layers)):
            h, key_cache, value_cache = self.layers[index].construct_cached(
                h, cos, sin, mask, write_weight, keep_weight, caches[2 * index], caches[2 * index + 1])
            new_caches = new_caches + (key_cache, value_cache)
        return self.norm_out(h[:, seq - 1:]), new_caches


class LlamaForCausalLM(nn.Cell):
    """`model(input_ids)` → logits [B, S, vocab] (float32); `model(input_ids, labels)` → mean loss.

    Labels are aligned with input_ids (as MindFormers' records store them): the model shifts
    them, so position t predicts labels[t + 1]. Tokens labelled `ignore_index` are not learned.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, config)
        self.compute_dtype = DTYPES[config.compute_dtype]
        self.ignore_index = config.ignore_index
        # The fused CPU cross-entropy (logits are float32 whatever the compute dtype); None elsewhere.
        self.fused_cross_entropy = cross_entropy()

    def logits_from_hidden(self, hidden):
        if self.config.tie_word_embeddings:
            weight = self.model.tok_embeddings.embedding_weight.astype(self.compute_dtype)
            flat = ops.reshape(hidden, (-1, hidden.shape[-1]))
            logits = ops.matmul(flat, weight.T).reshape(hidden.shape[:-1] + (weight.shape[0],))
        else:
            logits = self.lm_head(hidden)
        return logits.astype(ms.float32)

    def loss_terms(self, input_ids, labels, actual_seq_len=None, attention_mask=None):
        """(sum of token cross-entropies, count of learned tokens): the trainer divides by the
        count over the whole global batch so that splitting the batch changes nothing.

        In packed rows (actual_seq_len) a sample's last token is not trained to predict the
        next sample's first token."""
        hidden = self.model(input_ids, attention_mask, actual_seq_len)
        logits = self.logits_from_hidden(hidden[:, :-1])
        targets = labels[:, 1:]
        if actual_seq_len is not None:
            sample, _ = packed_segments(actual_seq_len, input_ids.shape[1])
            targets = ops.select(sample[:, 1:] == sample[:, :-1], targets, ops.full_like(targets, self.ignore_index))
        return causal_lm_loss_terms(logits, targets, self.ignore_index, self.fused_cross_entropy)

    def forward_cached(self, input_ids, position_ids, cache_mask, query_slots, caches):
        """Logits [B, vocab] of the last new token and the updated caches (see
        `LlamaModel.construct_cached`); what generation calls for prefill and for each step."""
        hidden, caches = self.model.construct_cached(input_ids, position_ids, cache_mask, query_slots, caches)
        return self.logits_from_hidden(hidden)[:, 0], caches

    def empty_caches(self, batch, cache_length):
        """Zeroed key/value caches for `batch` rows of `cache_length` slots."""
        config = self.config
        shape = (batch, config.n_kv_heads, cache_length, config.head_dim)
        return tuple(ops.zeros(shape, self.compute_dtype) for _ in range(2 * config.num_layers))

    def construct(self, input_ids, labels=None, attention_mask=None, actual_seq_len=None):
        if labels is None:
            return self.logits_from_hidden(self.model(input_ids, attention_mask, actual_seq_len))
        loss_sum, count = self.loss_terms(input_ids, labels, actual_seq_len, attention_mask)
        return loss_sum / ops.maximum(count, 1.0)


def causal_lm_loss_terms(logits, targets, ignore_index, fused=None):
    """Sum of cross-entropy over targets != ignore_index, and their count (float32 scalars).

    With `fused` (the CPU kernel of `cpu_kernels.cross_entropy`) one pass over the logits each
    way; else log_softmax + gather: measured on CPU ([2048, 32000] fp32) this forward+backward is
    ~2x faster than logsumexp − picked logit and far cheaper than nn.CrossEntropyLoss; masking
    here makes ignored tokens cost nothing in the sum.
    """
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_targets = targets.reshape(-1).astype(ms.int32)
    learned = flat_targets != ignore_index
    weights = learned.astype(ms.float32)
    if fused is not None:
        # The kernel skips negative targets; any other ignore_index is made negative first.
        per_token, _ = fused(flat_logits, ops.select(learned, flat_targets, ops.full_like(flat_targets, -1)))
        return per_token.sum(), weights.sum()
    safe_targets = ops.select(learned, flat_targets, ops.zeros_like(flat_targets))
    log_probs = ops.log_softmax(flat_logits, -1)
    picked = ops.gather_elements(log_probs, 1, safe_targets.reshape(-1, 1)).reshape(-1)
    return -(picked * weights).sum(), weights.sum()


def count_parameters(model):
    return sum(int(np.prod(p.shape)) for p in model.get_parameters())
