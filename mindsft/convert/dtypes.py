"""Tensor dtypes as each file format spells them, and exact element conversions between them.

Arrays are handled in their *storage* form: bfloat16 as uint16 bit patterns, because numpy has
no bfloat16 and a detour through another type would lose bits or cost a copy.
"""
import numpy as np

from mindsft.errors import ConvertError

# canonical name -> (numpy storage dtype, safetensors name, MindSpore .ckpt name, torch name)
_TABLE = {
    "float32": (np.float32, "F32", "Float32", "float32"),
    "float16": (np.float16, "F16", "Float16", "float16"),
    "bfloat16": (np.uint16, "BF16", "BFloat16", "bfloat16"),
    "float64": (np.float64, "F64", "Float64", "float64"),
    "int64": (np.int64, "I64", "Int64", "int64"),
    "int32": (np.int32, "I32", "Int32", "int32"),
    "int16": (np.int16, "I16", "Int16", "int16"),
    "int8": (np.int8, "I8", "Int8", "int8"),
    "uint8": (np.uint8, "U8", "UInt8", "uint8"),
    "bool": (np.bool_, "BOOL", "Bool", "bool"),
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_FROM_SAFETENSORS = {row[1]: name for name, row in _TABLE.items()}
_FROM_CKPT = {row[2]: name for name, row in _TABLE.items()}
_FROM_TORCH = {row[3]: name for name, row in _TABLE.items()}
_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}


_LOOKUP = {**{k.lower(): v for k, v in {**_FROM_SAFETENSORS, **_FROM_CKPT}.items()}, **_ALIASES,
           **{name: name for name in _TABLE}}


def canonical(name):
    """'fp16', 'float16', 'F16', 'torch.float16' ... -> 'float16'; None stays None."""
    if name is None:
        return None
    key = str(name).replace("torch.", "").replace("mstype.", "").lower()
    if key not in _LOOKUP:
        raise ConvertError(f"dtype {name!r} is not one of fp32, fp16, bf16")
    return _LOOKUP[key]


def from_safetensors(code, where):
    if code not in _FROM_SAFETENSORS:
        raise ConvertError(f"{where}: dtype {code} is not supported")
    return _FROM_SAFETENSORS[code]


def from_ckpt(code, where):
    if code not in _FROM_CKPT:
        raise ConvertError(f"{where}: tensor_type {code!r} is not supported")
    return _FROM_CKPT[code]


def from_torch(dtype, where):
    key = str(dtype).replace("torch.", "")
    if key not in _FROM_TORCH:
        raise ConvertError(f"{where}: dtype {dtype} is not supported")
    return _FROM_TORCH[key]


def is_ckpt_code(code):
    return code in _FROM_CKPT


def storage(dtype):
    """numpy dtype that holds `dtype`'s bits."""
    return np.dtype(_TABLE[dtype][0])


def itemsize(dtype):
    return storage(dtype).itemsize


def safetensors_code(dtype):
    return _TABLE[dtype][1]


def ckpt_code(dtype):
    return _TABLE[dtype][2]


def _bf16_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(values):
    # Round to nearest even, as torch and MindSpore do; NaN stays a (quiet) NaN.
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def convert(array, src, dst):
    """Convert a storage array from dtype `src` to `dst` (exact when widening)."""
    if src == dst:
        return array
    if src not in FLOAT_DTYPES or dst not in FLOAT_DTYPES:
        raise ConvertError(f"cannot convert {src} to {dst}")
    values = _bf16_to_f32(array) if src == "bfloat16" else array
    if dst == "bfloat16":
        return _f32_to_bf16(values.astype(np.float32, copy=False))
    with np.errstate(over="ignore"):  # out-of-range values become ±inf, as in torch
        return values.astype(storage(dst))
