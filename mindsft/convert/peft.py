"""LoRA adapters as files: HuggingFace PEFT folders (`adapter_model.safetensors` +
`adapter_config.json`) both ways, adapter `.ckpt` files, and the streaming merge of adapters
into base weights on disk (what `tools/merge_lora.py` does). No MindSpore: files to files.

Module names map through the model family's weight table (`models/families/`), so an adapter
on `model.layers.0.attention.wq` is PEFT's `base_model.model.model.layers.0.self_attn.q_proj`.
"""
import json
import os
import re

import numpy as np

from mindsft.convert import dtypes
from mindsft.convert.ckpt_format import CkptWriter, read_ckpt
from mindsft.convert.convert import TOKENIZER_FILES, model_config_path, ms_to_hf, write_model_config
from mindsft.errors import AdapterError, ConfigError, ConvertError
from mindsft.output_files import atomic_output, check_output_path
from mindsft.input_files import field, read_json
from mindsft.lora_config import LORA_A, LORA_B, LoraConfig, is_adapter_name, merged_weight, target_regex_from_hf_names
from mindsft.models.families import FAMILIES, family_of
from mindsft.weights import float32, open_base_weights

PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def hf_module_of(ms_module, family=None):
    hf = (family or FAMILIES["llama"]).hf_module_of(ms_module)
    if hf is None:
        raise ConvertError(f"no HuggingFace name for module {ms_module!r}")
    return hf


def ms_module_of(hf_module, source, family=None):
    family = family or FAMILIES["llama"]
    name = family.ms_module_of(hf_module)
    if name is None:
        raise ConvertError(f"{source}: adapter on {hf_module!r}, which is not a linear layer of a {family.name} model")
    return name


def lora_config_from_peft(adapter_config, source=PEFT_CONFIG, module_names=None, family=None):
    """LoraConfig from a PEFT `adapter_config.json` mapping; `module_names` (our full cell names
    the adapter file holds) pins the targets exactly, whatever target_modules says."""
    if not isinstance(adapter_config, dict):
        raise AdapterError(f"{source}: expected a JSON object of adapter settings")
    for key, types in (("r", int), ("lora_alpha", (int, float)), ("lora_dropout", (int, float)),
                       ("target_modules", (str, list)), ("use_rslora", bool), ("peft_type", str)):
        field(adapter_config, key, types, source, AdapterError, required=key in ("r", "lora_alpha"))
    if adapter_config["r"] < 1:
        raise AdapterError(f"{source}: r must be at least 1, got {adapter_config['r']}")
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
        target = targets if isinstance(targets, str) else target_regex_from_hf_names(targets, family)
    for key in ("r", "lora_alpha"):
        if key not in adapter_config:
            raise ConfigError(f"{source}: key {key!r} is missing")
    try:
        return LoraConfig(rank=int(adapter_config["r"]), alpha=float(adapter_config["lora_alpha"]),
                          dropout=float(adapter_config.get("lora_dropout") or 0.0), target_modules=target,
                          use_rslora=bool(adapter_config.get("use_rslora", False)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: r / lora_alpha / lora_dropout must be numbers ({exc})") from None


def peft_adapter_config(lora_config, module_names, family=None, base_model_name_or_path=None):
    """PEFT's `adapter_config.json` mapping for adapters on our cells `module_names`."""
    hf_modules = sorted(hf_module_of(name, family) for name in module_names)
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
        "r": lora_config.rank, "lora_alpha": lora_config.alpha, "lora_dropout": lora_config.dropout,
        "target_modules": target_modules, "use_rslora": lora_config.use_rslora, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_dora": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def write_peft_adapter(output_dir, lora_config, adapter_arrays, family=None, base_model_name_or_path=None):
    """Write {our adapter name: array} as a PEFT folder that `PeftModel.from_pretrained` loads."""
    from safetensors.numpy import save_file
    modules = sorted({name.rsplit(".", 1)[0] for name in adapter_arrays})
    tensors = {}
    for name, value in adapter_arrays.items():
        module, kind = name.rsplit(".", 1)
        tensors[f"{PEFT_PREFIX}{hf_module_of(module, family)}.lora_{'A' if kind == LORA_A else 'B'}.weight"] = \
            np.ascontiguousarray(value)
    adapter_config = peft_adapter_config(lora_config, modules, family, base_model_name_or_path)
    # A run's own output folder (or the caller's, who named it): a rerun replaces it.
    with atomic_output(output_dir, folder=True, overwrite=True) as tmp:
        os.makedirs(tmp)
        save_file(tensors, os.path.join(tmp, PEFT_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, PEFT_CONFIG), "w", encoding="utf-8") as f:
            json.dump(adapter_config, f, indent=2, sort_keys=True)
    return output_dir


def read_peft_adapter(adapter_dir, family=None):
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
    adapter_config = read_json(config_path, AdapterError, "PEFT adapter_config.json", expect=dict)
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
        module = ms_module_of(match.group("module"), weights_path, family)
        arrays[f"{module}.{LORA_A if match.group('ab') == 'A' else LORA_B}"] = value.astype(np.float32)
    modules = sorted({k.rsplit(".", 1)[0] for k in arrays})
    lora_config = lora_config_from_peft(adapter_config, config_path, module_names=modules, family=family)
    return lora_config, arrays


def unpacked_adapters(adapter_arrays, base_shapes, family=None):
    """Adapters on packed modules (Baichuan's `attention.w_qkv`: one A, one stacked B) as the
    same adapters on each cell of the pack (A shared, B's rows split): what merging folds."""
    packs = (family or FAMILIES["llama"]).lora_packs
    out = {}
    for name, value in adapter_arrays.items():
        module, kind = name.rsplit(".", 1)
        parent, _, local = module.rpartition(".")
        if local not in packs or not is_adapter_name(name):
            out[name] = value
            continue
        start = 0
        for member in packs[local]:
            member_module = f"{parent}.{member}"
            rows = tuple(base_shapes.get(f"{member_module}.weight", (0,)))[0]
            out[f"{member_module}.{kind}"] = value if kind == LORA_A else value[start:start + rows]
            start += rows
    return out


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


# ---- the merge tool's work ------------------------------------------------------------------------
# Built on mindsft.convert's streaming readers and writers: only the adapted weights are held in
# memory (in float32, one at a time), every other tensor is copied block by block in its own dtype,
# so merging into a 7B bfloat16 base needs little more memory than one weight.

def read_adapter(path, lora_config=None, family=None):
    """(LoraConfig, {adapter name: array}) from a PEFT folder or an adapter .ckpt (which needs `lora_config`
    for alpha: a checkpoint holds the weights, not the scaling)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return read_peft_adapter(path, family)
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such adapter checkpoint or PEFT folder")
    if lora_config is None:
        raise ConfigError(f"{path}: an adapter checkpoint does not record lora_alpha; give the pet_config "
                          "(or --lora_rank/--lora_alpha) it was trained with")
    tensors, _ = read_ckpt(path)
    return lora_config, {name: float32(t) for name, t in tensors.items() if is_adapter_name(name)}


def write_ckpt(arrays, path):
    """Write {name: array} as a MindSpore checkpoint, atomically."""
    with atomic_output(path) as tmp, CkptWriter(tmp) as writer:
        for name, value in arrays.items():
            value = np.ascontiguousarray(value)
            dtype = dtypes.canonical(str(value.dtype))
            writer.write(name, dtype, value.shape, [value.reshape(-1)])
    return path


def _write_merged_ckpt(tensors, adapter_arrays, modules, scaling, path, progress):
    from tqdm import tqdm
    adapted = {f"{m}.weight": m for m in modules}
    with atomic_output(path) as tmp, CkptWriter(tmp) as writer:
        for name, stored in tqdm(tensors.items(), desc="merge", unit="tensor", disable=not progress):
            if name in adapted:
                module = adapted[name]
                weight = merged_weight(float32(stored), adapter_arrays[f"{module}.{LORA_A}"],
                                       adapter_arrays[f"{module}.{LORA_B}"], scaling)
                blocks = [dtypes.convert(weight.reshape(-1), "float32", stored.dtype)]
            else:
                blocks = stored.blocks()
            writer.write(name, stored.dtype, stored.shape, blocks)
    return path


def merge_lora_files(base, adapter, output=None, hf_output=None, lora_config=None, model_config=None,
                     progress=True, overwrite=False):
    """Fold an adapter (PEFT folder or .ckpt) into base weights (.ckpt or HuggingFace folder).

    Writes a MindSpore checkpoint at `output` and/or a HuggingFace folder at `hf_output` (through
    mindsft.convert's ckpt→HF conversion; the model config comes from a HuggingFace base, else
    `model_config`). Weights keep their dtype. A non-empty `hf_output` folder is replaced only with
    `overwrite`. Returns the names of the merged weights.
    """
    import tempfile
    if not output and not hf_output:
        raise ConfigError("merge_lora: give an output checkpoint, a HuggingFace output folder, or both")
    if output:
        check_output_path(output)
    if hf_output:
        check_output_path(hf_output, folder=True, overwrite=overwrite)
    tensors, base_config, tokenizer_dir = open_base_weights(base)
    if tokenizer_dir and not any(os.path.isfile(os.path.join(tokenizer_dir, n)) for n in TOKENIZER_FILES):
        tokenizer_dir = None
    config = base_config or model_config
    family = family_of(config) if config is not None else None
    lora_config, adapter_arrays = read_adapter(adapter, lora_config, family)
    adapter_arrays = unpacked_adapters(adapter_arrays, {n: t.shape for n, t in tensors.items()}, family)
    modules = adapted_modules(adapter_arrays, {n: t.shape for n, t in tensors.items()}, lora_config,
                              source=os.fspath(adapter))
    if hf_output and config is None:
        raise ConfigError("merge_lora: a HuggingFace output needs the model config: give the run's YAML "
                          "(model.model_config) or use a HuggingFace folder as the base")
    if output:
        _write_merged_ckpt(tensors, adapter_arrays, modules, lora_config.scaling, output, progress)
        # The merged checkpoint carries its model as a converted one does (eval, predict and the
        # reverse conversion read it).
        if config is not None:
            write_model_config(config, model_config_path(output))
    if hf_output:
        if output:
            ms_to_hf(output, hf_output, config, tokenizer_dir=tokenizer_dir, progress=progress, overwrite=overwrite)
        else:
            folder = os.path.dirname(os.path.abspath(os.fspath(hf_output)))
            with tempfile.TemporaryDirectory(prefix=".merge-", dir=folder) as scratch:
                merged_ckpt = os.path.join(scratch, "merged.ckpt")
                _write_merged_ckpt(tensors, adapter_arrays, modules, lora_config.scaling, merged_ckpt, progress)
                ms_to_hf(merged_ckpt, hf_output, config, tokenizer_dir=tokenizer_dir, progress=progress,
                         overwrite=overwrite)
    return [f"{m}.weight" for m in modules]
