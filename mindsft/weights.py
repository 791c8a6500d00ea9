"""Where a run's weights are and what model they are: a `.ckpt` or `.safetensors` checkpoint (a
converted model, a training checkpoint, or a training output folder with `rank_{r}/`), or a
HuggingFace model folder; the model config that travels beside them. Tensors are opened, not read
(StoredTensor), so a caller streams them one at a time. No MindSpore: files to arrays.
"""
import os

import numpy as np

from mindsft.convert.ckpt_format import read_ckpt
from mindsft.convert.convert import model_config_path, read_model_config
from mindsft.convert.hf_reader import find_weights, open_hf_weights, read_hf_config
from mindsft.convert.safetensors_format import verify_safetensors
from mindsft.convert.stored import split_stored
from mindsft.errors import ConfigError, ConvertError
from mindsft.lora_config import is_adapter_name
from mindsft.models.families import family_of, model_config_from_hf

SUFFIXES = {"ckpt": ".ckpt", "safetensors": ".safetensors"}


def find_model_config(load_checkpoint):
    """The config file that travels with a checkpoint (`X.ckpt` → `X.config.json`, see
    convert.model_config_path), or a folder's `config.json`; None when there is none."""
    if not load_checkpoint:
        return None
    path = os.fspath(load_checkpoint)
    if os.path.isfile(path):
        candidates = [model_config_path(path), os.path.join(os.path.dirname(path), "config.json")]
    elif os.path.isdir(path):
        named = sorted(n for n in os.listdir(path) if n.endswith(".config.json"))
        candidates = [os.path.join(path, "config.json")] + ([os.path.join(path, named[0])] if len(named) == 1 else [])
    else:
        return None
    return next((c for c in candidates if os.path.isfile(c)), None)


def find_weights_file(load_checkpoint, rank=0, checkpoint_format=None):
    """The .ckpt to start from: the file itself, or the single .ckpt in a folder (or its rank_{r})."""
    if os.path.isfile(load_checkpoint):
        return load_checkpoint
    if not os.path.isdir(load_checkpoint):
        raise ConfigError(f"load_checkpoint {load_checkpoint}: no such file or folder")
    for folder in (os.path.join(load_checkpoint, f"rank_{rank}"), load_checkpoint):
        if os.path.isdir(folder):
            suffixes = (SUFFIXES[checkpoint_format],) if checkpoint_format else tuple(SUFFIXES.values())
            ckpts = sorted(n for n in os.listdir(folder) if n.endswith(suffixes) and not n.startswith("."))
            if len(ckpts) == 1:
                return os.path.join(folder, ckpts[0])
            if len(ckpts) > 1:
                raise ConfigError(f"load_checkpoint {folder}: holds {len(ckpts)} checkpoints ({', '.join(ckpts)}); "
                                  "name the file")
    raise ConfigError(f"load_checkpoint {load_checkpoint}: no {SUFFIXES.get(checkpoint_format, '.ckpt or .safetensors')} file in it")


def is_hf_folder(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def weights_location(load_checkpoint, rank=0, checkpoint_format=None):
    """A HuggingFace folder as it is, else the checkpoint file `find_weights_file` picks."""
    if is_hf_folder(load_checkpoint):
        return load_checkpoint
    return find_weights_file(load_checkpoint, rank, checkpoint_format)


def checkpoint_tensors(path):
    """{name: StoredTensor} of every tensor of a `.ckpt` or `.safetensors` checkpoint, checksums verified first."""
    return verify_safetensors(path) if path.endswith(".safetensors") else read_ckpt(path)[0]


def open_base_weights(path, model_config=None):
    """({our name: StoredTensor} of the model weights, LlamaConfig or None, HuggingFace folder or None)
    for a checkpoint file (optimizer state and adapters left out) or a HuggingFace folder (whose
    tokenizer files travel with it). A folder's tensors map through the family of `model_config`
    when given, else of its own config.json."""
    path = os.fspath(path)
    if os.path.isdir(path):
        weights_path, config_path = find_weights(path)
        if model_config is None:
            model_config = model_config_from_hf(read_hf_config(config_path), config_path)
            family = family_of(model_config)
        else:
            family = family_of(model_config)
        return split_stored(family.weight_entries(model_config), open_hf_weights(weights_path)), model_config, path
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such checkpoint file or HuggingFace folder")
    tensors = checkpoint_tensors(path)
    if model_config is None:
        # The config that travels beside a converted checkpoint names its family (how adapters map).
        config_path = find_model_config(path)
        model_config = read_model_config(config_path) if config_path else None
    return {name: t for name, t in tensors.items() if name.startswith(("model.", "lm_head."))
            and not is_adapter_name(name)}, model_config, None


def float32(stored):
    """A StoredTensor's values as one float32 array (bfloat16 widened exactly), filled block by
    block so that no second copy exists."""
    values = np.empty(stored.numel, np.float32)
    at = 0
    for block in stored.blocks("float32"):
        values[at:at + block.size] = block
        at += block.size
    return values.reshape(stored.shape)


def read_base_weights(path):
    """({our name: float32 array}, LlamaConfig or None) of a checkpoint file or HuggingFace folder."""
    tensors, model_config, _ = open_base_weights(path)
    return {name: float32(t) for name, t in tensors.items()}, model_config
