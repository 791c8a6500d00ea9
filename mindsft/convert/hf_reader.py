"""Finding and opening the weights of a HuggingFace model folder without loading them:
`model.safetensors`, sharded safetensors with `model.safetensors.index.json`,
`pytorch_model.bin`, and sharded `.bin` with `pytorch_model.bin.index.json`.

`.bin` files are pickles; they are opened with `torch.load(weights_only=True, mmap=True)`, which
refuses any pickle that would run code and maps the tensors instead of reading them. torch is
imported only then.
"""
import os
import re

from mindsft.convert import dtypes
from mindsft.convert.safetensors_format import read_safetensors
from mindsft.convert.stored import StoredTensor
from mindsft.errors import ConvertError
from mindsft.input_files import read_json

# In the order HuggingFace itself prefers them.
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")


def find_weights(input_path):
    """(weights file or index, config.json path) for a model folder or a weights file."""
    input_path = os.path.normpath(os.fspath(input_path))
    if os.path.isdir(input_path):
        for name in WEIGHT_FILES:
            candidate = os.path.join(input_path, name)
            if os.path.isfile(candidate):
                return candidate, os.path.join(input_path, "config.json")
        raise ConvertError(f"{input_path}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")
    if not os.path.isfile(input_path):
        raise ConvertError(f"{input_path}: file or folder not found")
    if not input_path.endswith((".safetensors", ".bin", ".index.json")):
        raise ConvertError(f"{input_path}: not a .safetensors, .bin or .index.json file")
    return input_path, os.path.join(os.path.dirname(input_path), "config.json")


def read_hf_config(config_path):
    """The parsed `config.json`, with a clear error when it is missing or not JSON."""
    if not os.path.exists(config_path):
        raise ConvertError(f"{config_path}: file not found (the model's config.json must sit beside its weights)")
    return read_json(config_path, ConvertError, "HuggingFace config.json", expect=dict)


def open_hf_weights(weights_path):
    """{HuggingFace name: StoredTensor} for a weights file or index; nothing is read yet."""
    if weights_path.endswith(".index.json"):
        return _open_index(weights_path)
    if weights_path.endswith(".safetensors"):
        return read_safetensors(weights_path)[0]
    return open_torch_bin(weights_path)


def _open_index(index_path):
    index = read_json(index_path, ConvertError, "safetensors index", expect=dict)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConvertError(f"{index_path} is corrupt: expected a 'weight_map' object of tensor name → file name")
    folder = os.path.dirname(index_path)
    tensors = {}
    for shard in sorted(set(weight_map.values()), key=str):
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise ConvertError(f"{shard_path}: file not found (listed in {index_path})")
        in_shard = open_hf_weights(shard_path)
        listed = {name for name, file in weight_map.items() if file == shard}
        absent = sorted(listed - set(in_shard))
        if absent:
            raise ConvertError(f"{shard_path} lacks tensors that {os.path.basename(index_path)} places there: "
                               f"{', '.join(absent)}")
        for name, tensor in in_shard.items():
            if name in tensors:
                raise ConvertError(f"tensor {name} is in both {tensors[name].file} and {shard_path}")
            tensors[name] = tensor
    return tensors


def open_torch_bin(path):
    """{name: StoredTensor} of a `torch.save` state dict, memory-mapped, refusing unsafe pickles."""
    import pickle
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ConvertError(f"{path}: refused, the pickle holds more than tensors and loading it could run code "
                           f"({_torch_reason(e, 'WeightsUnpickler error:')})") from None
    except Exception as e:  # torch reports truncation as RuntimeError, a missing zip member as KeyError...
        raise ConvertError(f"{path} is truncated or corrupt, or not a torch.save file "
                           f"({type(e).__name__}: {_torch_reason(e)})") from None
    if not isinstance(state, dict):
        raise ConvertError(f"{path}: expected a state dict, found {type(state).__name__}")
    tensors = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ConvertError(f"{path}: entry {name} is a {type(tensor).__name__}, not a tensor")
        dtype = dtypes.from_torch(tensor.dtype, f"{path}: tensor {name}")
        tensors[name] = StoredTensor(name, dtype, tuple(tensor.shape), path, _torch_reader(tensor, dtype))
    return tensors


def _torch_reason(error, marker=None):
    """The informative sentence of torch's long multi-line load errors."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    chosen = next((line for line in lines if marker and marker in line), lines[0] if lines else "")
    chosen = chosen.split(marker, 1)[-1].strip() if marker else chosen
    return chosen.split(". ")[0].rstrip(".")


def _torch_reader(tensor, dtype):
    import torch

    def read_blocks(max_elements):
        flat = tensor.contiguous().reshape(-1)
        if dtype == "bfloat16":
            flat = flat.view(torch.int16)
        for start in range(0, flat.numel(), max_elements):
            # A copy of just this block, so the mapped pages are not pinned by our arrays.
            block = flat[start:start + max_elements].numpy().copy()
            yield block.view(dtypes.storage(dtype))
    return read_blocks
