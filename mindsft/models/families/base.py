"""What a model family is: how its HuggingFace `config.json` maps to `LlamaConfig`, and how its
HuggingFace weights map to the one network's MindFormers-named parameters.

A weight entry maps one HuggingFace tensor to one or more of ours. With several, the HF tensor
is ours stacked along dim 0 (Baichuan's `W_pack` = q, k, v): the rows of a [out, in] weight
are contiguous, so splitting on the way in and fusing on the way out both stream.
"""
import dataclasses
from typing import Callable, Dict, List, Tuple

from mindsft.errors import ConvertError
from mindsft.models.config import LlamaConfig

Shape = Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class WeightEntry:
    hf_name: str
    ms_names: Tuple[str, ...]
    ms_shapes: Tuple[Shape, ...]

    @property
    def hf_shape(self):
        first = self.ms_shapes[0]
        return (sum(shape[0] for shape in self.ms_shapes),) + tuple(first[1:])

    @property
    def is_split(self):
        return len(self.ms_names) > 1


@dataclasses.dataclass(frozen=True)
class Family:
    """One family's module contents; the registry (`models/families/__init__.py`) holds them."""
    name: str
    mindformers_names: Tuple[str, ...]      # convert_weight.py --model values
    arch_types: Tuple[str, ...]             # MindFormers' model.arch.type
    hf_architectures: Tuple[str, ...]
    hf_model_types: Tuple[str, ...]
    config_from_hf: Callable                # (hf_config mapping, source) -> LlamaConfig
    config_to_hf: Callable                  # (LlamaConfig, dtype) -> config.json mapping
    weight_entries: Callable                # (LlamaConfig) -> [WeightEntry] in model order
    hf_ignored: Callable[[str], bool] = lambda name: False   # buffers that are recomputed, never weights
    # HuggingFace projection name (as PEFT's target_modules spell it) -> our cell names it covers.
    lora_projections: Dict[str, Tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # LlamaConfig settings every model of the family has (Qwen2's q/k/v biases), applied when a
    # config is built from MindFormers' model_config rather than read from a config.json.
    model_flags: Dict[str, object] = dataclasses.field(default_factory=dict)
    # A HF projection that is several of our cells stacked (Baichuan's W_pack = wq, wk, wv), as
    # LoRA sees it: our name for the packed module -> the cells it stacks, in order, and its HF
    # name pattern -> ours, `{i}` the layer index. A LoRA on it has one A and one stacked B.
    lora_packs: Dict[str, Tuple[str, ...]] = dataclasses.field(default_factory=dict)
    packed_renames: Tuple[Tuple[str, str], ...] = ()

    def weight_shapes(self, config):
        """{MindFormers name: shape} of every parameter, in model order."""
        return {name: shape for entry in self.weight_entries(config)
                for name, shape in zip(entry.ms_names, entry.ms_shapes)}

    def hf_to_ms_arrays(self, hf_arrays, config):
        """{our name: array} from {HF name: array} (whole tensors: tests and small models)."""
        out = {}
        for entry in self.weight_entries(config):
            if entry.hf_name not in hf_arrays:
                continue
            value, start = hf_arrays[entry.hf_name], 0
            for name, shape in zip(entry.ms_names, entry.ms_shapes):
                out[name] = value[start:start + shape[0]]
                start += shape[0]
        return out

    def ms_to_hf_arrays(self, ms_arrays, config):
        """{HF name: array} from {our name: array} (whole tensors: tests and small models)."""
        import numpy as np
        out = {}
        for entry in self.weight_entries(config):
            if all(name in ms_arrays for name in entry.ms_names):
                parts = [np.asarray(ms_arrays[name]) for name in entry.ms_names]
                out[entry.hf_name] = parts[0] if len(parts) == 1 else np.concatenate(parts, 0)
        return out

    def renames(self):
        """[(HF pattern, our pattern)] of the one-to-one entries, `{i}` the layer index: what maps
        module names (LoRA adapters) whatever the model's depth."""
        probe = LlamaConfig(**{**self.model_flags, "family": self.name, "vocab_size": 8, "hidden_size": 8,
                               "num_layers": 1, "num_heads": 1, "intermediate_size": 8})
        return [(e.hf_name.replace(".layers.0.", ".layers.{i}."), e.ms_names[0].replace(".layers.0.", ".layers.{i}."))
                for e in self.weight_entries(probe) if not e.is_split] + list(self.packed_renames)

    def hf_module_of(self, ms_module):
        """HuggingFace module name of our linear cell (`model.layers.3.attention.wq` →
        `model.layers.3.self_attn.q_proj`), or None."""
        return _rename(ms_module + ".weight", [(ours, theirs) for theirs, ours in self.renames()], ".weight")

    def ms_module_of(self, hf_module):
        """Our cell name of a HuggingFace linear module, or None."""
        return _rename(hf_module + ".weight", self.renames(), ".weight")


def _rename(name, pairs, suffix):
    import re
    for source, target in pairs:
        pattern = "^" + re.escape(source).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$"
        match = re.match(pattern, name)
        if match:
            renamed = target.replace("{i}", match.group("i")) if "{i}" in source else target
            return renamed[:-len(suffix)]
    return None


def mismatch_hints(config, missing, unexpected, wrong_shapes):
    """The settings that most likely explain a name/shape mismatch between weights and a config
    (names in either spelling, ours or HuggingFace's)."""
    hints = []
    if config is None:
        return hints
    if "lm_head.weight" in missing and not config.tie_word_embeddings:
        hints.append("the weights have no lm_head.weight: if the model ties it to the embedding, "
                     "set tie_word_embeddings: True")
    if "lm_head.weight" in unexpected and config.tie_word_embeddings:
        hints.append("the weights hold an lm_head.weight: set tie_word_embeddings: False")
    for suffix, flag, what in ((".bias", "qkv_has_bias", "q/k/v bias"), ("_norm.weight", "qk_norm", "q/k norm")):
        if any(n.endswith(suffix) and ("attention." in n or "self_attn." in n) for n in unexpected):
            hints.append(f"the weights hold {what} tensors: set {flag}: True")
        if any(n.endswith(suffix) and ("attention." in n or "self_attn." in n) for n in missing):
            hints.append(f"the weights have no {what} tensors: set {flag}: False")
    if any(".layers." in n for n in list(missing) + list(unexpected)):
        hints.append(f"layer tensors disagree with num_layers {config.num_layers}")
    settings = (("wk", "n_kv_heads / head_dim"), ("wv", "n_kv_heads / head_dim"), ("k_proj", "n_kv_heads / head_dim"),
                ("v_proj", "n_kv_heads / head_dim"), ("wq", "num_heads / head_dim"), ("q_proj", "num_heads / head_dim"),
                ("wo", "num_heads / head_dim"), ("o_proj", "num_heads / head_dim"), ("feed_forward", "intermediate_size"),
                ("mlp", "intermediate_size"), ("embed", "vocab_size / hidden_size"),
                ("lm_head", "vocab_size / hidden_size"), ("norm", "hidden_size"))
    for name in wrong_shapes:
        parts = name.split(".")
        for part, setting in settings:
            if any(p == part or p.startswith(part) for p in parts):
                hints.append(f"check {setting}")
                break
    return list(dict.fromkeys(hints))


def model_shape_text(name, got, want):
    return f"{name} {tuple(got)} (model expects {tuple(want)})"


def check_weights(expected, given, source, config=None, shape_text=model_shape_text, limit=5,
                  phrases=("tensors missing for the model", "tensors the model does not have",
                           "shapes that disagree")):
    """The one name/shape check of weights against a model: raise one ConvertError if `given`
    {name: shape} does not match `expected` {name: shape}.

    The message names at most `limit` tensors of each kind, with both shapes, and the settings
    that likely explain it (tie_word_embeddings, n_kv_heads, ...). `phrases` (missing, extra,
    wrong shape) and `shape_text` word it for the caller: the converter checks against a config
    file, LoRA loading checks adapters.
    """
    missing = [n for n in expected if n not in given]
    unexpected = [n for n in given if n not in expected]
    wrong = [n for n in expected if n in given and tuple(given[n]) != tuple(expected[n])]
    if not (missing or unexpected or wrong):
        return

    def listed(items):
        more = f" and {len(items) - limit} more" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    problems = []
    if missing:
        problems.append(f"{phrases[0]}: {listed(missing)}")
    if unexpected:
        problems.append(f"{phrases[1]}: {listed(unexpected)}")
    if wrong:
        problems.append(f"{phrases[2]}: {listed([shape_text(n, given[n], expected[n]) for n in wrong])}")
    hints = mismatch_hints(config, missing, unexpected, wrong)
    hint = f" — {'; '.join(hints)}" if hints else ""
    raise ConvertError(f"{source}: " + " | ".join(problems) + hint)


def entries_from_table(table, config) -> List[WeightEntry]:
    """WeightEntry list from [(HF pattern, our pattern or tuple of ours, shape or tuple of shapes)]
    with `{i}` the layer index: per-layer rows repeat for each layer, in model order."""
    entries = []

    def add(hf, ms, shapes, i=None):
        fill = (lambda s: s.replace("{i}", str(i))) if i is not None else (lambda s: s)
        ms_names = (ms,) if isinstance(ms, str) else tuple(ms)
        ms_shapes = (shapes,) if isinstance(shapes[0], int) else tuple(shapes)
        entries.append(WeightEntry(fill(hf), tuple(fill(n) for n in ms_names), ms_shapes))

    head = [row for row in table if "{i}" not in row[0] and not row[0].startswith(("model.norm", "lm_head"))]
    layer = [row for row in table if "{i}" in row[0]]
    tail = [row for row in table if row[0].startswith(("model.norm", "lm_head"))]
    for row in head:
        add(*row)
    for i in range(config.num_layers):
        for row in layer:
            add(*row, i=i)
    for row in tail:
        add(*row)
    return entries
