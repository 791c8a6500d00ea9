"""The one HuggingFace ⇄ MindSpore (MindFormers) Llama weight-name table.

Plain renames: both sides store linear weights as [out, in], and HuggingFace's q/k weights are
already in the half-split rotary layout our model uses, so no tensor is transposed or permuted.
"""
import re

# (HuggingFace pattern, MindFormers pattern); `{i}` is the layer index.
HF_TO_MS_PATTERNS = (
    ("model.embed_tokens.weight", "model.tok_embeddings.embedding_weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.attention.wq.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "model.layers.{i}.attention.wk.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "model.layers.{i}.attention.wv.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "model.layers.{i}.attention.wo.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.feed_forward.w1.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "model.layers.{i}.feed_forward.w2.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "model.layers.{i}.feed_forward.w3.weight"),
    ("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.attention_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.ffn_norm.weight"),
    ("model.norm.weight", "model.norm_out.weight"),
    ("lm_head.weight", "lm_head.weight"),
)

# HuggingFace buffers that are recomputed, never weights.
HF_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$|^model\.rotary_emb\.inv_freq$")


def _compile(pattern):
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_HF_TO_MS = [(_compile(hf), ms) for hf, ms in HF_TO_MS_PATTERNS]
_MS_TO_HF = [(_compile(ms), hf) for hf, ms in HF_TO_MS_PATTERNS]


def _translate(name, table):
    for regex, target in table:
        match = regex.match(name)
        if match:
            return target.replace("{i}", match.group("i")) if "i" in regex.groupindex else target
    return None


def hf_to_ms_name(name):
    """MindFormers name for a HuggingFace tensor name, or None if the table does not know it."""
    return _translate(name, _HF_TO_MS)


def ms_to_hf_name(name):
    """HuggingFace name for a MindFormers parameter name, or None if the table does not know it."""
    return _translate(name, _MS_TO_HF)


def expected_ms_names(num_layers, tie_word_embeddings=False):
    """Every parameter name a Llama of this depth holds, in model order."""
    per_layer = [ms for _, ms in HF_TO_MS_PATTERNS if "{i}" in ms]
    names = ["model.tok_embeddings.embedding_weight"]
    for i in range(num_layers):
        names.extend(pattern.replace("{i}", str(i)) for pattern in per_layer)
    names.append("model.norm_out.weight")
    if not tie_word_embeddings:
        names.append("lm_head.weight")
    return names
