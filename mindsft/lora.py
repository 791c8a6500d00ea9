"""LoRA: low-rank adapters on the Llama's linear projections, their merge into the base weights,
and their exchange with HuggingFace PEFT (`adapter_model.safetensors` + `adapter_config.json`).

Adapter parameters carry MindFormers' names (`<module>.mindpet_delta_lora_a` [rank, in] and
`<module>.mindpet_delta_lora_b` [out, rank]) so our adapter checkpoints read like MindFormers'
LoRA checkpoints; the base weight of each adapted module keeps its exact name and is frozen.
"""
import dataclasses
import difflib
import json
import math
import os
import re

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mindsft.convert.names import HF_TO_MS_PATTERNS, hf_to_ms_name, ms_to_hf_name
from mindsft.errors import ConfigError, ConvertError
from mindsft.files import atomic_output
from mindsft.models.llama import DTYPES, Linear
from mindsft.models.quant_linear import QuantizedLinear

LORA_A = "mindpet_delta_lora_a"
LORA_B = "mindpet_delta_lora_b"
PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"

# HuggingFace projection name -> our cell name, read off the one name table (q_proj -> wq, ...).
HF_TO_MS_PROJECTIONS = {
    hf.split(".")[-2]: ms.split(".")[-2]
    for hf, ms in HF_TO_MS_PATTERNS if hf.endswith("_proj.weight")
}
MS_TO_HF_PROJECTIONS = {ms_name: hf for hf, ms_name in HF_TO_MS_PROJECTIONS.items()}


@dataclasses.dataclass
class LoraConfig:
    """What to adapt and how: rank, alpha (scaling = alpha / rank), dropout on the adapter input.

    `target_modules` is MindFormers' regex: a linear cell of the decoder is adapted when the
    regex matches its own name from the start (`re.match('.*wq|.*wv', 'wq')`), as MindFormers'
    LoRA adapter does; a cell anywhere (lm_head included) is also adapted when the regex matches
    its full dotted name exactly, which is how adapters of one layer only are named.
    """
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = ".*wq|.*wv"
    exclude_layers: tuple = ()
    use_rslora: bool = False

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"lora_rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.dropout!r}")
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)
        if isinstance(self.exclude_layers, str):
            self.exclude_layers = (self.exclude_layers,)
        self.exclude_layers = tuple(self.exclude_layers or ())
        for rule in (self.target_modules, *self.exclude_layers):
            try:
                re.compile(rule)
            except (re.error, TypeError) as exc:
                raise ConfigError(f"LoRA target/exclude regex {rule!r} does not compile: {exc}") from None

    @property
    def scaling(self):
        """The factor on B·A: alpha / rank, or alpha / sqrt(rank) with rank-stabilised LoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    # MindFormers' pet_config keys that change nothing in what is computed here.
    MINDFORMERS_IGNORED_KEYS = frozenset({"pet_type", "lora_a_init", "lora_b_init", "param_init_type",
                                          "compute_dtype", "freeze_include", "freeze_exclude"})

    @classmethod
    def from_mindformers(cls, pet_config):
        """Build from MindFormers' `model.model_config.pet_config` mapping (pet_type lora)."""
        pet_config = dict(pet_config)
        pet_type = str(pet_config.get("pet_type", "lora")).lower()
        if pet_type != "lora":
            raise ConfigError(f"pet_config: pet_type {pet_config.get('pet_type')!r} is not supported (lora only)")
        for key in ("freeze_include", "freeze_exclude"):
            if pet_config.get(key):
                raise ConfigError(f"pet_config: {key} is not supported: only the LoRA weights are trained")
        known = {"lora_rank": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout",
                 "target_modules": "target_modules", "exclude_layers": "exclude_layers",
                 "use_rslora": "use_rslora"}
        kwargs = {}
        for key, value in pet_config.items():
            if key in known:
                if value is not None:
                    kwargs[known[key]] = value
            elif key not in cls.MINDFORMERS_IGNORED_KEYS:
                near = difflib.get_close_matches(key, sorted(set(known) | cls.MINDFORMERS_IGNORED_KEYS), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"pet_config: unknown key {key!r}{hint}")
        return cls(**kwargs)

    @classmethod
    def from_llamafactory(cls, args):
        """Build from LLaMA-Factory's spellings: finetuning_type lora, lora_rank, lora_alpha
        (default 2·rank, as LLaMA-Factory), lora_dropout, lora_target ('q_proj,v_proj' or 'all')."""
        args = dict(args)
        if str(args.get("finetuning_type", "lora")).lower() != "lora":
            raise ConfigError(f"finetuning_type {args['finetuning_type']!r} is not lora")
        for key in ("use_dora", "additional_target", "pissa_init", "loraplus_lr_ratio"):
            if args.get(key):
                raise ConfigError(f"{key} is not supported by mindsft's LoRA")
        rank = int(args.get("lora_rank", 8))
        alpha = args.get("lora_alpha")
        return cls(rank=rank, alpha=float(alpha) if alpha is not None else 2.0 * rank,
                   dropout=float(args.get("lora_dropout", 0.0)),
                   target_modules=target_regex_from_hf_names(args.get("lora_target", "all")),
                   use_rslora=bool(args.get("use_rslora", False)))

    @classmethod
    def from_peft(cls, adapter_config, source=PEFT_CONFIG, module_names=None):
        """Build from a PEFT `adapter_config.json` mapping; `module_names` (our full cell names
        the adapter file holds) pins the targets exactly, whatever target_modules says."""
        if adapter_config.get("peft_type", "LORA") != "LORA":
            raise ConfigError(f"{source}: peft_type {adapter_config.get('peft_type')!r} is not LORA")
        unsupported = {"use_dora": False, "bias": "none", "fan_in_fan_out": False, "lora_bias": False,
                       "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
                       "layer_replication": None, "trainable_token_indices": None}
        for key, plain in unsupported.items():
            value = adapter_config.get(key)
            if value not in (None, {}, []) and value != plain:
                raise ConfigError(f"{source}: {key}={value!r} is not supported by mindsft's LoRA "
                                  f"(only plain LoRA on linear layers)")
        if module_names:
            target = "|".join(re.escape(name) for name in sorted(module_names))
        else:
            targets = adapter_config.get("target_modules") or []
            target = targets if isinstance(targets, str) else target_regex_from_hf_names(targets)
        return cls(rank=int(adapter_config["r"]), alpha=float(adapter_config["lora_alpha"]),
                   dropout=float(adapter_config.get("lora_dropout") or 0.0), target_modules=target,
                   use_rslora=bool(adapter_config.get("use_rslora", False)))

    def to_peft(self, module_names, base_model_name_or_path=None):
        """PEFT's `adapter_config.json` mapping for adapters on our cells `module_names`."""
        hf_modules = sorted(ms_to_hf_module(name) for name in module_names)
        suffixes = sorted({name.split(".")[-1] for name in hf_modules})
        layered = [name for name in hf_modules if re.match(r"model\.layers\.\d+\.", name)]
        layers = {name.split(".")[2] for name in layered}
        # A suffix list is what PEFT users write; it is exact only when every layer has them all.
        if len(layered) == len(hf_modules) and len(hf_modules) == len(layers) * len(suffixes):
            target_modules = suffixes
        else:
            target_modules = "|".join(re.escape(name) for name in hf_modules)
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "target_modules": target_modules, "use_rslora": self.use_rslora, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_dora": False,
            "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        }


def target_regex_from_hf_names(names):
    """MindFormers regex for HuggingFace projection names ('q_proj,v_proj', a list, or 'all')."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    if names == ["all"]:
        # LLaMA-Factory's `all`: every linear layer of the decoder, never the output head.
        names = list(HF_TO_MS_PROJECTIONS)
    unknown = [n for n in names if n not in HF_TO_MS_PROJECTIONS]
    if unknown or not names:
        raise ConfigError(f"lora_target {unknown or names!r}: known projections are "
                          f"{', '.join(HF_TO_MS_PROJECTIONS)} or 'all'")
    return "|".join(".*" + HF_TO_MS_PROJECTIONS[n] for n in names)


def ms_to_hf_module(ms_module):
    hf = ms_to_hf_name(ms_module + ".weight")
    if hf is None:
        raise ConvertError(f"no HuggingFace name for module {ms_module!r}")
    return hf[: -len(".weight")]


def hf_to_ms_module(hf_module, source):
    name = hf_to_ms_name(hf_module + ".weight")
    if name is None:
        raise ConvertError(f"{source}: adapter on {hf_module!r}, which is not a Llama linear layer")
    return name[: -len(".weight")]


class LoraLinear(nn.Cell):
    """y = x·Wᵀ + scaling · dropout(x)·Aᵀ·Bᵀ; W is the frozen base weight, A and B are trained."""

    def __init__(self, base, rank, scaling, dropout, lora_a, param_dtype):
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.compute_dtype = base.compute_dtype
        self.scaling = scaling
        self.weight = base.weight
        self.weight.requires_grad = False
        self.matmul = ops.MatMul(transpose_b=True)
        self.mindpet_delta_lora_a = Parameter(Tensor(lora_a, param_dtype), name=LORA_A)
        self.mindpet_delta_lora_b = Parameter(Tensor(np.zeros((self.out_features, rank), np.float32), param_dtype),
                                              name=LORA_B)
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()

    def base_product(self, x):
        return self.matmul(x, self.weight.astype(self.compute_dtype))

    def construct(self, x):
        out_shape = x.shape[:-1] + (self.out_features,)
        x = ops.reshape(x.astype(self.compute_dtype), (-1, self.in_features))
        y = self.base_product(x)
        low_rank = self.matmul(self.lora_dropout(x), self.mindpet_delta_lora_a.astype(self.compute_dtype))
        y = y + self.matmul(low_rank, self.mindpet_delta_lora_b.astype(self.compute_dtype)) * self.scaling
        return ops.reshape(y, out_shape)


class LoraQuantizedLinear(LoraLinear):
    """LoRA on a quantized frozen base (QLoRA): the base cell, kept as `base_layer` as PEFT names
    it, dequantizes its own weight; gradients reach A and B through that product."""

    def __init__(self, base, rank, scaling, dropout, lora_a, param_dtype):
        nn.Cell.__init__(self)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.compute_dtype = base.compute_dtype
        self.scaling = scaling
        self.base_layer = base
        self.matmul = ops.MatMul(transpose_b=True)
        self.mindpet_delta_lora_a = Parameter(Tensor(lora_a, param_dtype), name=LORA_A)
        self.mindpet_delta_lora_b = Parameter(Tensor(np.zeros((self.out_features, rank), np.float32), param_dtype),
                                              name=LORA_B)
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()

    def base_product(self, x):
        return self.base_layer(x)


def _cell_at(model, dotted):
    cell = model
    for part in dotted.split(".") if dotted else []:
        cell = getattr(cell, part)
    return cell


def _put_cell(model, full_name, cell):
    parent_name, _, attr = full_name.rpartition(".")
    setattr(_cell_at(model, parent_name), attr, cell)
    # A cell set after construction is prefixed with its attribute name only.
    cell.update_parameters_name(full_name + ".")


def select_lora_modules(model, lora_config):
    """Full names of the linear cells `lora_config` adapts, in model order."""
    excluded_prefixes, chosen, linear_names = [], [], []
    for full_name, cell in model.cells_and_names():
        if not full_name:
            continue
        local = full_name.rsplit(".", 1)[-1]
        if any(re.match(rule, local) for rule in lora_config.exclude_layers):
            excluded_prefixes.append(full_name + ".")
        if isinstance(cell, LoraLinear):
            raise ConfigError(f"LoRA is already applied to {full_name}")
        if not isinstance(cell, (Linear, QuantizedLinear)) or any((full_name + ".").startswith(p) for p in excluded_prefixes):
            continue
        linear_names.append(full_name)
        in_decoder = full_name.startswith("model.")
        if (in_decoder and re.match(lora_config.target_modules, local)) or \
                re.fullmatch(lora_config.target_modules, full_name):
            chosen.append(full_name)
    if not chosen:
        examples = ", ".join(linear_names[:8])
        raise ConfigError(f"LoRA target_modules {lora_config.target_modules!r} matches no linear layer "
                          f"(they are named like {examples})")
    return chosen


def apply_lora(model, lora_config, seed=0):
    """Replace the chosen Linear cells of `model` by LoraLinear cells in place; freeze the rest.

    A is drawn as PEFT draws it (kaiming-uniform with a=√5, i.e. U(±1/√in)) from `seed`; B is zero,
    so the adapted model starts equal to the base. Returns the full names of the adapted cells.
    """
    chosen = select_lora_modules(model, lora_config)
    rng = np.random.default_rng(seed)
    param_dtype = DTYPES[model.config.param_init_type]
    for param in model.get_parameters():
        param.requires_grad = False
    for full_name in chosen:
        base = _cell_at(model, full_name)
        bound = 1.0 / math.sqrt(base.in_features)
        lora_a = rng.uniform(-bound, bound, (lora_config.rank, base.in_features)).astype(np.float32)
        wrapper = LoraQuantizedLinear if isinstance(base, QuantizedLinear) else LoraLinear
        _put_cell(model, full_name, wrapper(base, lora_config.rank, lora_config.scaling,
                                               lora_config.dropout, lora_a, param_dtype))
    model.lora_config = lora_config
    return chosen


def lora_modules(model):
    """{full cell name: LoraLinear} of a model with LoRA applied."""
    return {name: cell for name, cell in model.cells_and_names() if isinstance(cell, LoraLinear)}


def is_adapter_name(name):
    return name.endswith("." + LORA_A) or name.endswith("." + LORA_B)


def adapter_state(model):
    """{name: Parameter} of the adapter weights only: what a LoRA checkpoint holds."""
    return {p.name: p for p in model.get_parameters() if is_adapter_name(p.name)}


def load_adapter_state(model, arrays, source="adapter checkpoint"):
    """Copy {adapter name: array} into a model with LoRA applied; names and shapes must match exactly.

    Entries that are not adapter weights (optimizer state, step counters) are ignored.
    """
    params = adapter_state(model)
    given = {k: v for k, v in arrays.items() if is_adapter_name(k)}
    unknown = sorted(set(given) - set(params))
    missing = sorted(set(params) - set(given))
    wrong = [f"{k} {tuple(np.shape(v))} (model expects {tuple(params[k].shape)})"
             for k, v in given.items() if k in params and tuple(np.shape(v)) != tuple(params[k].shape)]
    problems = [f"{what}: {', '.join(names)}" for what, names in
                (("adapters the model does not have", unknown), ("adapters missing", missing),
                 ("shapes that disagree", wrong)) if names]
    if problems:
        raise ConvertError(f"{source}: " + " | ".join(problems))
    for name, value in given.items():
        value = value if isinstance(value, Tensor) else Tensor(np.asarray(value))
        params[name].set_data(value.astype(params[name].dtype))


def merged_weight(weight, lora_a, lora_b, scaling):
    """W + scaling · B·A, computed in float32 and returned in W's dtype."""
    delta = np.asarray(lora_b, np.float32) @ np.asarray(lora_a, np.float32)
    return (np.asarray(weight, np.float32) + np.float32(scaling) * delta).astype(np.asarray(weight).dtype)


def merge_lora(model):
    """Fold every adapter into its base weight in place; the model is a plain Llama again."""
    if any(isinstance(cell, LoraQuantizedLinear) for cell in lora_modules(model).values()):
        raise ConfigError("merge_lora: the base is quantized; merge the adapters into the full-precision base "
                          "with tools/merge_lora.py")
    for full_name, cell in lora_modules(model).items():
        weight = merged_weight(cell.weight.asnumpy(), cell.mindpet_delta_lora_a.asnumpy(),
                               cell.mindpet_delta_lora_b.asnumpy(), cell.scaling)
        plain = Linear(cell.in_features, cell.out_features, model.config)
        plain.weight = Parameter(Tensor(weight), name="weight", requires_grad=True)
        _put_cell(model, full_name, plain)
    for param in model.get_parameters():
        param.requires_grad = True
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def adapted_modules(adapter_arrays, base_shapes, lora_config, source="adapter"):
    """Names of the modules the adapters change, after checking each A/B pair fits its base weight."""
    modules = sorted({k.rsplit(".", 1)[0] for k in adapter_arrays if is_adapter_name(k)})
    if not modules:
        raise ConvertError(f"{source}: holds no LoRA adapter weights (*.{LORA_A} / *.{LORA_B})")
    for module in modules:
        a_name, b_name, w_name = f"{module}.{LORA_A}", f"{module}.{LORA_B}", f"{module}.weight"
        for name in (a_name, b_name):
            if name not in adapter_arrays:
                raise ConvertError(f"{source}: {name} is missing (each adapter needs both A and B)")
        if w_name not in base_shapes:
            raise ConvertError(f"{source}: adapter on {module}, but the base has no tensor {w_name}")
        a_shape, b_shape, w_shape = np.shape(adapter_arrays[a_name]), np.shape(adapter_arrays[b_name]), \
            tuple(base_shapes[w_name])
        if len(w_shape) != 2 or b_shape[0] != w_shape[0] or a_shape[1] != w_shape[1] or a_shape[0] != b_shape[1]:
            raise ConvertError(f"{source}: {module}: A {a_shape} and B {b_shape} do not fit the base weight {w_shape}")
        if a_shape[0] != lora_config.rank:
            raise ConvertError(f"{source}: {a_name} has rank {a_shape[0]}, the LoRA config says {lora_config.rank}")
    return modules


def merge_adapter_arrays(base_arrays, adapter_arrays, lora_config, source="adapter"):
    """{name: array} of base weights with the adapters {…mindpet_delta_lora_a/b: array} folded in."""
    merged = dict(base_arrays)
    shapes = {name: np.shape(value) for name, value in base_arrays.items()}
    for module in adapted_modules(adapter_arrays, shapes, lora_config, source):
        merged[f"{module}.weight"] = merged_weight(base_arrays[f"{module}.weight"], adapter_arrays[f"{module}.{LORA_A}"],
                                                   adapter_arrays[f"{module}.{LORA_B}"], lora_config.scaling)
    return merged


def parameter_report(model):
    """(trainable count, total count, line) — the line as PEFT's print_trainable_parameters writes it."""
    trainable = sum(int(np.prod(p.shape)) for p in model.trainable_params())
    total = sum(int(np.prod(p.shape)) for p in model.get_parameters())
    line = (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100.0 * trainable / max(total, 1):.4f}")
    return trainable, total, line


# ---- PEFT format ----------------------------------------------------------------------------

def peft_arrays(model):
    """{PEFT tensor name: float array} of the adapters of `model`."""
    arrays = {}
    for full_name, cell in lora_modules(model).items():
        hf_module = PEFT_PREFIX + ms_to_hf_module(full_name)
        arrays[hf_module + ".lora_A.weight"] = cell.mindpet_delta_lora_a.asnumpy()
        arrays[hf_module + ".lora_B.weight"] = cell.mindpet_delta_lora_b.asnumpy()
    return arrays


def save_peft_adapter(model, output_dir, base_model_name_or_path=None):
    """Write `adapter_model.safetensors` + `adapter_config.json` that `PeftModel.from_pretrained` loads."""
    from safetensors.numpy import save_file
    lora_config = getattr(model, "lora_config", None)
    if lora_config is None:
        raise ConfigError("save_peft_adapter: the model has no LoRA applied")
    arrays = peft_arrays(model)
    adapter_config = lora_config.to_peft(list(lora_modules(model)), base_model_name_or_path)
    with atomic_output(output_dir) as tmp:
        os.makedirs(tmp)
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, os.path.join(tmp, PEFT_WEIGHTS),
                  metadata={"format": "pt"})
        with open(os.path.join(tmp, PEFT_CONFIG), "w", encoding="utf-8") as f:
            json.dump(adapter_config, f, indent=2, sort_keys=True)
    return output_dir


def read_peft_adapter(adapter_dir):
    """(LoraConfig, {our adapter name: array}) from a PEFT adapter folder."""
    from safetensors.numpy import load_file
    config_path = os.path.join(adapter_dir, PEFT_CONFIG)
    weights_path = os.path.join(adapter_dir, PEFT_WEIGHTS)
    if not os.path.isfile(config_path):
        raise ConvertError(f"{adapter_dir}: no {PEFT_CONFIG} (is this a PEFT adapter folder?)")
    if not os.path.isfile(weights_path):
        hint = " (adapter_model.bin found: re-save it with safe_serialization=True)" \
            if os.path.exists(os.path.join(adapter_dir, "adapter_model.bin")) else ""
        raise ConvertError(f"{adapter_dir}: no {PEFT_WEIGHTS}{hint}")
    with open(config_path, encoding="utf-8") as f:
        try:
            adapter_config = json.load(f)
        except json.JSONDecodeError as exc:
            raise ConvertError(f"{config_path}: not valid JSON: {exc}") from None
    try:
        tensors = load_file(weights_path)
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise ConvertError(f"{weights_path}: cannot be read: {exc}") from None
    pattern = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
    arrays = {}
    for key, value in tensors.items():
        match = pattern.match(key)
        if not match:
            raise ConvertError(f"{weights_path}: tensor {key!r} is not a LoRA A/B weight on a linear layer")
        module = hf_to_ms_module(match.group("module"), weights_path)
        arrays[f"{module}.{LORA_A if match.group('ab') == 'A' else LORA_B}"] = value.astype(np.float32)
    modules = sorted({k.rsplit(".", 1)[0] for k in arrays})
    lora_config = LoraConfig.from_peft(adapter_config, config_path, module_names=modules)
    return lora_config, arrays


def load_peft_adapter(model, adapter_dir, seed=0):
    """Apply LoRA to `model` as a PEFT adapter folder describes and load its weights; returns its LoraConfig."""
    lora_config, arrays = read_peft_adapter(adapter_dir)
    apply_lora(model, lora_config, seed)
    load_adapter_state(model, arrays, source=os.path.join(adapter_dir, PEFT_WEIGHTS))
    return lora_config


# ---- files: the merge tool's work ---------------------------------------------------------------
# Built on mindsft.convert's streaming readers and writers: only the adapted weights are held in
# memory (in float32, one at a time), every other tensor is copied block by block in its own dtype,
# so merging into a 7B bfloat16 base needs little more memory than one weight.

def _float32(stored):
    """A StoredTensor's values as a float32 array (bfloat16 widened exactly)."""
    return np.concatenate([block for block in stored.blocks("float32")]).reshape(stored.shape)


def open_base_weights(path):
    """({MindFormers name: StoredTensor} of the model weights, LlamaConfig or None, tokenizer folder or None)
    for a .ckpt (optimizer state and adapters left out) or a HuggingFace model folder."""
    from mindsft.convert.ckpt_format import read_ckpt
    from mindsft.convert.hf_reader import find_weights, open_hf_weights, read_hf_config
    from mindsft.models.llama import LlamaConfig
    path = os.fspath(path)
    if os.path.isdir(path):
        weights_path, config_path = find_weights(path)
        config = LlamaConfig.from_hf(read_hf_config(config_path), source=config_path)
        tensors = {hf_to_ms_name(name): t for name, t in open_hf_weights(weights_path).items()
                   if hf_to_ms_name(name) is not None}
        return tensors, config, path
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such checkpoint file or HuggingFace folder")
    tensors, _ = read_ckpt(path)
    return {name: t for name, t in tensors.items() if ms_to_hf_name(name) is not None}, None, None


def read_base_weights(path):
    """({MindFormers name: float32 array}, LlamaConfig or None) of a .ckpt or HuggingFace folder."""
    tensors, config, _ = open_base_weights(path)
    return {name: _float32(t) for name, t in tensors.items()}, config


def read_adapter(path, lora_config=None):
    """(LoraConfig, {adapter name: array}) from a PEFT folder or an adapter .ckpt (which needs `lora_config`
    for alpha: a checkpoint holds the weights, not the scaling)."""
    from mindsft.convert.ckpt_format import read_ckpt
    path = os.fspath(path)
    if os.path.isdir(path):
        return read_peft_adapter(path)
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such adapter checkpoint or PEFT folder")
    if lora_config is None:
        raise ConfigError(f"{path}: an adapter checkpoint does not record lora_alpha; give the pet_config "
                          "(or --lora_rank/--lora_alpha) it was trained with")
    tensors, _ = read_ckpt(path)
    return lora_config, {name: _float32(t) for name, t in tensors.items() if is_adapter_name(name)}


def save_ms_checkpoint(arrays, path):
    """Write {name: array} as a MindSpore checkpoint, atomically."""
    with atomic_output(path) as tmp:
        # save_checkpoint appends `.ckpt` to names without it, so write under that name and move.
        ms.save_checkpoint([{"name": k, "data": Tensor(np.ascontiguousarray(v))} for k, v in arrays.items()],
                           tmp + ".ckpt")
        os.replace(tmp + ".ckpt", tmp)
    return path


def _write_merged_ckpt(tensors, adapter_arrays, modules, scaling, path, progress):
    from tqdm import tqdm
    from mindsft.convert import dtypes
    from mindsft.convert.ckpt_format import CkptWriter
    adapted = {f"{m}.weight": m for m in modules}
    with atomic_output(path) as tmp, CkptWriter(tmp) as writer:
        for name, stored in tqdm(tensors.items(), desc="merge", unit="tensor", disable=not progress):
            if name in adapted:
                module = adapted[name]
                weight = merged_weight(_float32(stored), adapter_arrays[f"{module}.{LORA_A}"],
                                       adapter_arrays[f"{module}.{LORA_B}"], scaling)
                blocks = [dtypes.convert(weight.reshape(-1), "float32", stored.dtype)]
            else:
                blocks = stored.blocks()
            writer.write(name, stored.dtype, stored.shape, blocks)
    return path


def merge_lora_files(base, adapter, output=None, hf_output=None, lora_config=None, model_config=None,
                     progress=True):
    """Fold an adapter (PEFT folder or .ckpt) into base weights (.ckpt or HuggingFace folder).

    Writes a MindSpore checkpoint at `output` and/or a HuggingFace folder at `hf_output` (through
    mindsft.convert's ckpt→HF conversion; the model config comes from a HuggingFace base, else
    `model_config`). Weights keep their dtype. Returns the names of the merged weights.
    """
    import tempfile
    from mindsft.convert.convert import TOKENIZER_FILES, ms_to_hf
    if not output and not hf_output:
        raise ConfigError("merge_lora: give an output checkpoint, a HuggingFace output folder, or both")
    tensors, base_config, tokenizer_dir = open_base_weights(base)
    if tokenizer_dir and not any(os.path.isfile(os.path.join(tokenizer_dir, n)) for n in TOKENIZER_FILES):
        tokenizer_dir = None
    lora_config, adapter_arrays = read_adapter(adapter, lora_config)
    modules = adapted_modules(adapter_arrays, {n: t.shape for n, t in tensors.items()}, lora_config,
                              source=os.fspath(adapter))
    config = base_config or model_config
    if hf_output and config is None:
        raise ConfigError("merge_lora: a HuggingFace output needs the model config: give the run's YAML "
                          "(model.model_config) or use a HuggingFace folder as the base")
    if output:
        _write_merged_ckpt(tensors, adapter_arrays, modules, lora_config.scaling, output, progress)
    if hf_output:
        if output:
            ms_to_hf(output, hf_output, config, tokenizer_dir=tokenizer_dir, progress=progress)
        else:
            folder = os.path.dirname(os.path.abspath(os.fspath(hf_output)))
            with tempfile.TemporaryDirectory(prefix=".merge-", dir=folder) as scratch:
                merged_ckpt = os.path.join(scratch, "merged.ckpt")
                _write_merged_ckpt(tensors, adapter_arrays, modules, lora_config.scaling, merged_ckpt, progress)
                ms_to_hf(merged_ckpt, hf_output, config, tokenizer_dir=tokenizer_dir, progress=progress)
    return [f"{m}.weight" for m in modules]
