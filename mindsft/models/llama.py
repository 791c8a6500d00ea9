"""The Llama-family decoder, top to bottom: RMSNorm, rotary embedding, attention with
grouped key/value heads, SwiGLU MLP, decoder layer, model, causal-LM head and its loss.

It computes what HuggingFace transformers' `LlamaForCausalLM` computes on the same weights,
and its parameter names are MindFormers' Llama names so checkpoints interoperate. The other
families are flags of the same cells (`LlamaConfig`): q/k/v biases (Qwen2), per-head q/k
RMSNorm (Qwen3), a sliding attention window (Mistral), a row-normalised head (Baichuan2).
"""
import hashlib
import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, lazy_inline, nn, ops
from mindspore.common.initializer import Normal, One, initializer

from mindsft.cpu_kernels import (FEW_ROWS, causal_attention, cross_entropy, cross_entropy_backward, decode_attention,
                                 few_rows_linear, packed_attention, rms_norm_rows)
from mindsft.models.config import LlamaConfig  # noqa: F401 - the one config the network is built from

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
# Rows x vocabulary of one chunk of the head's logits in the training loss (float32 elements,
# 32 MB): the [tokens, vocab] logits and their gradient never exist whole.
HEAD_CHUNK_ELEMENTS = 1 << 23


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
    # Broadcast explicitly (see `broadcast_like`).
    cos, sin = broadcast_like(cos, x), broadcast_like(sin, x)
    return x * cos + rotate_half(x) * sin


def broadcast_like(small, x):
    """`small` broadcast to x's shape, as its own op. MindSpore's CPU kernel for a broadcasting
    multiply or add keeps a buffer of ~16 bytes per output element for as long as the compiled
    graph lives (measured: 17 MB for each [512, 2048] product, never reused), so every such op
    of every layer added to the step's peak: ~140 MB a TinyLlama layer at 512 tokens forward,
    more in training. A BroadcastTo followed by a same-shape product keeps nothing."""
    return ops.broadcast_to(small, x.shape)


def attention_probs(scores):
    """Softmax over the last axis, as exp(log_softmax): the same values to rounding, and on
    MindSpore's CPU backend its backward measured ~30% faster on [32, 512, 512] scores."""
    return ops.exp(ops.log_softmax(scores, -1))


def additive_mask(allowed):
    """0 where attention is allowed, -1e30 where not (float32, added to the scores)."""
    return ops.select(allowed, ops.zeros(allowed.shape, ms.float32), ops.full(allowed.shape, -1e30, dtype=ms.float32))


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


def weight_product(x, weight, matmul, few_rows=None):
    """x [M, in] · weightᵀ ([out, in]): through the few-rows kernel when it exists and M is small
    (the row count is static, so a compiled graph holds one branch only)."""
    if few_rows is not None and x.shape[0] <= FEW_ROWS:
        return few_rows(x, weight)
    return matmul(x, weight)


class Linear(nn.Cell):
    """y = x · Wᵀ (+ b) with W stored [out, in] (as HuggingFace and MindFormers store it)."""

    def __init__(self, in_features, out_features, config, has_bias=False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = DTYPES[config.compute_dtype]
        self.weight = Parameter(initializer(Normal(config.initializer_range), [out_features, in_features],
                                            DTYPES[config.param_init_type]), name="weight")
        self.has_bias = has_bias
        if has_bias:
            self.bias = Parameter(initializer("zeros", [out_features], DTYPES[config.param_init_type]), name="bias")
        self.matmul = ops.MatMul(transpose_b=True)
        # A decode step's few rows (CPU, fp32); None elsewhere.
        self.few_rows = few_rows_linear() if self.compute_dtype == ms.float32 else None

    def construct(self, x):
        out_shape = x.shape[:-1] + (self.out_features,)
        x = ops.reshape(x.astype(self.compute_dtype), (-1, self.in_features))
        y = weight_product(x, self.weight.astype(self.compute_dtype), self.matmul, self.few_rows)
        if self.has_bias:
            y = y + self.bias.astype(self.compute_dtype)
        return ops.reshape(y, out_shape)


class NormHead(nn.Cell):
    """Baichuan2's output head: logits = x · normalize(W)ᵀ, every row of W scaled to unit length in
    the forward pass, so training updates the raw weight as Baichuan's own training does."""

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
        weight = self.weight.astype(ms.float32)
        # torch's F.normalize: the norm clamped at 1e-12, in float32 whatever the weight's dtype.
        norms = ops.maximum(ops.sqrt((weight * weight).sum(1, keepdims=True)), 1e-12)
        weight = (weight / norms).astype(self.compute_dtype)
        x = ops.reshape(x.astype(self.compute_dtype), (-1, self.in_features))
        return ops.reshape(self.matmul(x, weight), out_shape)


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
        # A decode step's rows in one op (CPU, fp32, no gradient); None elsewhere.
        fp32 = DTYPES[config.compute_dtype] == ms.float32 and DTYPES[config.param_init_type] == ms.float32
        self.fused_rows = rms_norm_rows() if fp32 else None
        self.eps_tensor = Tensor(np.array([eps], np.float32))

    def decode_rows(self, x):
        """The same norm for a decode step (no gradient), through the fused op where there is one."""
        if self.fused_rows is None:
            return self.construct(x)
        return self.fused_rows(x, self.weight, self.eps_tensor)

    def construct(self, x):
        input_dtype = x.dtype
        x32 = x.astype(ms.float32)
        variance = ops.mean(x32 * x32, -1, keep_dims=True)
        normed = (x32 * broadcast_like(ops.rsqrt(variance + self.eps), x32)).astype(input_dtype)
        return broadcast_like(self.weight.astype(input_dtype), normed) * normed


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
        self.wq = Linear(config.hidden_size, q_size, config, has_bias=config.qkv_has_bias)
        self.wk = Linear(config.hidden_size, kv_size, config, has_bias=config.qkv_has_bias)
        self.wv = Linear(config.hidden_size, kv_size, config, has_bias=config.qkv_has_bias)
        self.wo = Linear(q_size, config.hidden_size, config)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, config)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, config)
        # The fused causal kernel (CPU, fp32); None elsewhere, and then MindSpore's own ops run.
        self.fused_causal = causal_attention(config.head_dim) if self.compute_dtype == ms.float32 else None
        # Its packed-row form. On Ascend the same offsets would go to FlashAttentionScore's
        # actual_seq_qlen/kvlen (TND layout); that is not built (it cannot run here), and the
        # additive block-diagonal mask below serves every device.
        self.fused_packed = packed_attention(config.head_dim) if self.fused_causal is not None else None
        # A decode step's attention in one op (CPU, fp32); None elsewhere.
        self.fused_decode = decode_attention() if self.compute_dtype == ms.float32 else None

    def rotated_qkv(self, x, cos, sin):
        """Queries (rotated, pre-scaled by 1/sqrt(head_dim)), keys (rotated), values: [B, heads, S, head_dim]."""
        batch, seq = x.shape[0], x.shape[1]
        q = self.wq(x).reshape(batch, seq, self.num_heads, self.head_dim)
        k = self.wk(x).reshape(batch, seq, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(0, 2, 1, 3)
        k = k.transpose(0, 2, 1, 3)
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

    def construct_decode(self, x, cos, sin, mask, slot, rows, key_cache, value_cache):
        """`construct_cached` for one new token per row through the fused decode kernel, each
        row's cache first taken from row rows[r]: x [B, 1, hidden], cos/sin [B, head_dim],
        mask [B, T] additive, slot [1] int32."""
        batch = x.shape[0]
        q = self.wq(x)
        k = self.wk(x)
        if self.qk_norm:
            q = self.q_norm(q.reshape(batch, self.num_heads, self.head_dim))
            k = self.k_norm(k.reshape(batch, self.n_kv_heads, self.head_dim))
        q = q.reshape(batch, self.num_heads * self.head_dim)
        k = k.reshape(batch, self.n_kv_heads * self.head_dim)
        v = self.wv(x).reshape(batch, self.n_kv_heads * self.head_dim)
        out, key_cache, value_cache = self.fused_decode(q, k, v, cos, sin, mask, slot, rows, key_cache, value_cache)
        return self.wo(out.reshape(batch, 1, self.num_heads * self.head_dim)), key_cache, value_cache


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

    def construct_decode(self, x, cos, sin, mask, slot, rows, key_cache, value_cache):
        attended, key_cache, value_cache = self.attention.construct_decode(
            self.attention_norm.decode_rows(x), cos, sin, mask, slot, rows, key_cache, value_cache)
        h = x + attended
        return h + self.feed_forward(self.ffn_norm.decode_rows(h)), key_cache, value_cache


class ReusedDecoderLayer(DecoderLayer):
    """The decoder layer, compiled once and reused by every layer (MindSpore's lazy inline with the
    "front" policy: the layer's graph is parsed, typed and differentiated once, then inlined into
    the step). Measured on CPU at SmolLM2-135M's shape (30 layers, 1 x 128 tokens, full training
    step): 46 s of compile CPU time against 63 s inlined, 5,851 against 6,162 MiB peak, the same
    losses. The default policy (a call graph kept to the end) and jit levels O0/O1 are refused by
    the CPU backend ("Input[0] must be a Primitive ValueNode")."""

    @lazy_inline(policy="front")
    def __init__(self, config):
        super().__init__(config)

    def key_by_structure(self):
        """After cells of this layer are replaced (LoRA on some projections, a merge), key it by its
        cells and parameter shapes: MindSpore compiles one graph per `cell_init_args` and runs it
        for every layer holding that key, so layers that differ must not share one."""
        cells = [(name, type(cell).__name__) for name, cell in self.cells_and_names()]
        shapes = [(name, tuple(param.shape)) for name, param in self.parameters_and_names()]
        digest = hashlib.sha1(repr((cells, shapes)).encode()).hexdigest()
        self.cell_init_args = f"lazy_inline_{type(self).__name__}_{digest}"


class LlamaModel(nn.Cell):
    def __init__(self, config, reuse_layers=True):
        """reuse_layers: layers compiled once (`ReusedDecoderLayer`); False inlines each one."""
        super().__init__()
        self.config = config
        self.compute_dtype = DTYPES[config.compute_dtype]
        self.tok_embeddings = Embedding(config)
        layer = ReusedDecoderLayer if reuse_layers else DecoderLayer
        self.layers = nn.CellList([layer(config) for _ in range(config.num_layers)])
        self.norm_out = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
        self.inv_freq = Tensor(rope_inverse_frequencies(config))
        self.fused_causal = self.layers[0].attention.fused_causal is not None
        self.fused_decode = self.layers[0].attention.fused_decode is not None
        self.sliding_window = config.sliding_window

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
        windowed = self.sliding_window is not None and seq > self.sliding_window
        if windowed:
            # Mistral's window, as transformers masks it: a token sees the `sliding_window` slots
            # up to and including its own (the fused kernels know no window, so the mask path runs).
            index = ops.arange(0, seq, dtype=ms.int32)
            causal = ops.logical_and(causal, index.reshape(1, seq) > index.reshape(seq, 1) - self.sliding_window)
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
        if attention_mask is None and self.fused_causal and not windowed:
            mask = None  # plain causal: the fused kernel needs no mask
        else:
            mask = additive_mask(allowed)
        cos, sin = self.rotary_tables(position_ids)
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, actual_seq_len)
        return self.norm_out(h)

    def construct_cached(self, input_ids, position_ids, cache_mask, query_slots, caches, source_rows=None):
        """Run new tokens against a key/value cache: the prompt (prefill) or one token (decode).

        input_ids, position_ids [B, S] int32; cache_mask [B, T] (1 = slot holds a real token,
        the new ones included); query_slots [S] int32, the cache slot of each new token (the same
        for every row: prompts are left-padded); caches: tuple of 2·num_layers tensors
        [B, kv_heads, T, head_dim] (keys, values per layer); source_rows [B] int32, optional: row
        r continues the cache of row source_rows[r] (beam search). Returns (final hidden state of
        the last new token [B, 1, hidden], updated caches).
        """
        batch, seq = input_ids.shape
        cache_len = caches[0].shape[2]
        slots = ops.arange(0, cache_len, dtype=ms.int32).reshape(1, cache_len)
        query_slots = query_slots.reshape(seq, 1)
        causal = slots <= query_slots
        if self.sliding_window is not None and cache_len > self.sliding_window:
            causal = ops.logical_and(causal, slots > query_slots - self.sliding_window)
        allowed = ops.logical_and(causal.reshape(1, 1, seq, cache_len),
                                  cache_mask.astype(ms.bool_).reshape(batch, 1, 1, cache_len))
        mask = additive_mask(allowed)
        cos, sin = self.rotary_tables(position_ids)
        h = self.tok_embeddings(input_ids)
        if self.fused_decode and seq == 1:
            return self.decode_layers(h, cos, sin, mask, query_slots, caches, source_rows)
        if source_rows is not None:
            gathered = ()
            for cache in caches:
                gathered = gathered + (ops.gather(cache, source_rows, 0),)
            caches = gathered
        written = (slots == query_slots).astype(self.compute_dtype)
        write_weight = written.transpose(1, 0)
        keep_weight = 1 - written.sum(0).reshape(cache_len, 1)
        new_caches = ()
        for index in range(len(self.layers)):
            h, key_cache, value_cache = self.layers[index].construct_cached(
                h, cos, sin, mask, write_weight, keep_weight, caches[2 * index], caches[2 * index + 1])
            new_caches = new_caches + (key_cache, value_cache)
        return self.norm_out(h[:, seq - 1:]), new_caches

    def decode_layers(self, h, cos, sin, mask, query_slots, caches, source_rows):
        """The layers of a one-token decode step through the fused decode kernel."""
        batch, cache_len = h.shape[0], caches[0].shape[2]
        rows = ops.arange(0, batch, dtype=ms.int32) if source_rows is None else source_rows.astype(ms.int32)
        cos, sin = cos.reshape(batch, cos.shape[-1]), sin.reshape(batch, sin.shape[-1])
        mask = mask.reshape(batch, cache_len)
        slot = query_slots.reshape(1).astype(ms.int32)
        new_caches = ()
        for index in range(len(self.layers)):
            h, key_cache, value_cache = self.layers[index].construct_decode(
                h, cos, sin, mask, slot, rows, caches[2 * index], caches[2 * index + 1])
            new_caches = new_caches + (key_cache, value_cache)
        return self.norm_out.decode_rows(h), new_caches


class HeadLossChunk(nn.Cell):
    """Cross-entropy summed over one chunk of rows, straight from hidden states: hidden [C, H],
    weight [V, H] (the output head's), targets [C] int32 (negative: not learned) → (loss sum,
    log-sum-exp [C]).

    Its backward recomputes the chunk's logits instead of keeping them, so the forward pass holds
    no [C, V] logits once the chunk's loss is summed, and the backward pass one chunk's logits and
    their gradient at a time. The weight is an input, not a Parameter of this cell: MindSpore
    refuses a custom bprop on a cell that owns trainable parameters."""

    def __init__(self):
        super().__init__()
        self.cross_entropy = cross_entropy()
        self.cross_entropy_backward = cross_entropy_backward()
        self.matmul = ops.MatMul(transpose_b=True)
        self.weight_gradient = ops.MatMul(transpose_a=True)

    def construct(self, hidden, weight, targets):
        per_token, lse = self.cross_entropy(self.matmul(hidden, weight), targets)
        return per_token.sum(), lse

    def bprop(self, hidden, weight, targets, out, dout):
        # Through dout: the recomputed product waits for the backward pass (else the scheduler
        # may run it beside the forward one, and every chunk's logits would live at once).
        hidden = ops.depend(hidden, dout[0])
        logits = self.matmul(hidden, weight)
        dloss = ops.broadcast_to(dout[0].reshape(1), targets.shape)
        dlogits = self.cross_entropy_backward(logits, targets, out[1], dloss)
        return ops.matmul(dlogits, weight), self.weight_gradient(dlogits, hidden), ops.zeros_like(targets)


class LlamaForCausalLM(nn.Cell):
    """`model(input_ids)` → logits [B, S, vocab] (float32); `model(input_ids, labels)` → mean loss.

    Labels are aligned with input_ids (as MindFormers' records store them): the model shifts
    them, so position t predicts labels[t + 1]. Tokens labelled `ignore_index` are not learned.
    """

    def __init__(self, config, reuse_layers=True):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, reuse_layers)
        if config.norm_head:
            self.lm_head = NormHead(config.hidden_size, config.vocab_size, config)
        elif not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, config)
        self.compute_dtype = DTYPES[config.compute_dtype]
        self.ignore_index = config.ignore_index
        # The fused CPU cross-entropy (logits are float32 whatever the compute dtype); None elsewhere.
        self.fused_cross_entropy = cross_entropy()
        self.few_rows = few_rows_linear() if self.compute_dtype == ms.float32 else None
        self.matmul = ops.MatMul(transpose_b=True)
        # The training loss in chunks of rows from the hidden states (fp32, the CPU kernels, a head
        # that is one weight matrix); None elsewhere, and then the whole logits are computed.
        chunked = (self.fused_cross_entropy is not None and cross_entropy_backward() is not None
                   and self.compute_dtype == ms.float32)
        self.head_loss_chunk = HeadLossChunk() if chunked else None

    def recompute_layers(self):
        """Each decoder layer's activations recomputed in the backward pass instead of kept from
        the forward one (MindFormers' `recompute_config.recompute`). Measured on CPU at
        SmolLM2-135M's shape (12 layers, batch 2 x 512, layers reused): the step's peak falls by
        ~52 MB a layer (3,979 -> 3,351 MiB)."""
        for layer in self.model.layers:
            layer.recompute()

    def head_weight(self):
        """The output head as one [vocab, hidden] matrix in the compute dtype, None when the head is
        not one (LoRA or quantization on lm_head)."""
        if self.config.tie_word_embeddings:
            return self.model.tok_embeddings.embedding_weight.astype(self.compute_dtype)
        if self.config.norm_head:
            weight = self.lm_head.weight.astype(ms.float32)
            norms = ops.maximum(ops.sqrt((weight * weight).sum(1, keepdims=True)), 1e-12)
            return (weight / norms).astype(self.compute_dtype)
        if isinstance(self.lm_head, Linear):
            return self.lm_head.weight.astype(self.compute_dtype)
        return None

    def logits_from_hidden(self, hidden):
        if self.config.tie_word_embeddings:
            weight = self.model.tok_embeddings.embedding_weight.astype(self.compute_dtype)
            flat = ops.reshape(hidden, (-1, hidden.shape[-1])).astype(self.compute_dtype)
            logits = weight_product(flat, weight, self.matmul, self.few_rows)
            logits = logits.reshape(hidden.shape[:-1] + (weight.shape[0],))
        else:
            logits = self.lm_head(hidden)
        return logits.astype(ms.float32)

    def loss_terms(self, input_ids, labels, actual_seq_len=None, attention_mask=None):
        """(sum of token cross-entropies, count of learned tokens): the trainer divides by the
        count over the whole global batch so that splitting the batch changes nothing.

        In packed rows (actual_seq_len) a sample's last token is not trained to predict the
        next sample's first token."""
        hidden = self.model(input_ids, attention_mask, actual_seq_len)
        targets = labels[:, 1:]
        if actual_seq_len is not None:
            sample, _ = packed_segments(actual_seq_len, input_ids.shape[1])
            targets = ops.select(sample[:, 1:] == sample[:, :-1], targets, ops.full_like(targets, self.ignore_index))
        if self.head_loss_chunk is not None and self.head_weight() is not None:
            return self.chunked_loss_terms(hidden[:, :-1], targets, self.head_weight())
        logits = self.logits_from_hidden(hidden[:, :-1])
        return causal_lm_loss_terms(logits, targets, self.ignore_index, self.fused_cross_entropy)

    def chunked_loss_terms(self, hidden, targets, weight):
        """`causal_lm_loss_terms` of the head's logits, computed chunk by chunk of rows so that the
        whole [tokens, vocab] float32 logits and their gradient never exist (`HeadLossChunk`)."""
        flat = hidden.reshape(-1, hidden.shape[-1]).astype(self.compute_dtype)
        flat_targets = targets.reshape(-1).astype(ms.int32)
        learned = flat_targets != self.ignore_index
        # The kernel skips negative targets; any other ignore_index is made negative first.
        kernel_targets = ops.select(learned, flat_targets, ops.full_like(flat_targets, -1))
        rows = flat.shape[0]
        chunk = max(1, min(rows, HEAD_CHUNK_ELEMENTS // weight.shape[0]))
        total = None
        for start in range(0, rows, chunk):
            end = min(start + chunk, rows)
            part, lse = self.head_loss_chunk(flat[start:end], weight, kernel_targets[start:end])
            # The log-sum-exp is read by the chunk's backward only; unused here, MindSpore's
            # graph pass drops it with a warning on the user's console ("side effect nodes
            # eliminated by mistake").
            part = ops.depend(part, lse)
            total = part if total is None else total + part
        return total, learned.astype(ms.float32).sum()

    def forward_cached(self, input_ids, position_ids, cache_mask, query_slots, caches, source_rows=None):
        """Logits [B, vocab] of the last new token and the updated caches (see
        `LlamaModel.construct_cached`); what generation calls for prefill and for each step."""
        hidden, caches = self.model.construct_cached(input_ids, position_ids, cache_mask, query_slots, caches,
                                                     source_rows)
        # A reshape, not [:, 0]: MindSpore's CPU StridedSlice took 1.7 ms on [1, 1, 32000] logits.
        return self.logits_from_hidden(hidden.reshape(hidden.shape[0], hidden.shape[2])), caches

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
