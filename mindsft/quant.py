"""Weight quantization for QLoRA, exactly as bitsandbytes stores a frozen base (pure numpy).

4-bit (`Linear4bit`): the flattened weight is cut into blocks of 64; each block keeps its
absolute maximum (absmax) and every value becomes the index of the nearest entry of a 16-value
code (NF4: quantiles of a normal; FP4: a 1-sign, 2-exponent, 1-mantissa float), two indices
per byte, the first in the high nibble. With double quantization the float32 absmax are
themselves stored in 8 bits: their mean (the offset) is subtracted, then they are quantized in
blocks of 256 with bitsandbytes' signed dynamic 8-bit code, each block keeping its own absmax.

8-bit (`Int8Params`, LLM.int8): each output row of the weight, rounded to float16 first as
bitsandbytes does, is scaled by 127 / its absolute maximum and rounded to int8; the row's
absmax (`SCB`) is kept in float32. The weight is dequantized as codes · (SCB · 1/127).
Outlier decomposition (bitsandbytes' `llm_int8_threshold`) concerns the activations of an
int8 × int8 product; we never quantize activations (the weight is dequantized and multiplied in
float32, which is also what bitsandbytes computes on the CPU while training), so there is no
threshold to choose and no outlier columns to keep.
"""
import dataclasses
from typing import Optional, Tuple

import numpy as np

BLOCK_SIZE = 64              # bitsandbytes' 4-bit blocksize (transformers' default)
NESTED_BLOCK_SIZE = 256      # blocks of the double-quantized absmax
QUANT_TYPES = ("nf4", "fp4")
QUANTIZATION_BITS = (4, 8)   # LLaMA-Factory's quantization_bit: bitsandbytes' 4-bit or LLM.int8
QUANTIZATION_METHODS = ("bitsandbytes", "bnb")


@dataclasses.dataclass(frozen=True)
class Quantization:
    """LLaMA-Factory's quantization_bit / quantization_type / double_quantization, as the run
    config validated them (`config.validate_quantization`)."""
    bits: int
    quant_type: str = "nf4"
    double_quant: bool = True

    def describe(self):
        if self.bits == 8:
            return "8-bit LLM.int8 rows"
        return f"4-bit {self.quant_type}" + (", double quantization" if self.double_quant else "")

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1), scaled to [-1, 1].
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
# get_4bit_type("fp4"): codes in bit-pattern order (sign, 2 exponent bits, 1 mantissa bit),
# divided by their largest magnitude (12) in float32 as bitsandbytes does.
_FP4_RAW = np.array([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                     -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], np.float32)
FP4_CODE = _FP4_RAW / np.float32(12.0)
CODES_4BIT = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def _float32_linspace(start, end, steps):
    """torch.linspace in float32 on the CPU: the first half counted up from start, the rest
    down from end, each value one fused multiply-add (float64 here, exact, then rounded once)."""
    start, end = np.float32(start), np.float32(end)
    step = np.float64(np.float32((end - start) / np.float32(steps - 1)))
    index = np.arange(steps, dtype=np.float64)
    up = np.float64(start) + step * index
    down = np.float64(end) - step * (steps - 1 - index)
    return np.where(index < steps // 2, up, down).astype(np.float32)


def dynamic_code():
    """bitsandbytes' signed dynamic 8-bit code (`create_dynamic_map()`): 256 sorted values in [-1, 1]."""
    data = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        boundaries = _float32_linspace(0.1, 1, 2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        means = (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (means * np.float32(scale)).astype(np.float32).tolist()
        data += (means * np.float32(-scale)).astype(np.float32).tolist()
    data += [0.0, 1.0]
    return np.sort(np.array(data, np.float32))


DYNAMIC_CODE = dynamic_code()


# ---- 8-bit blockwise (the double-quantized absmax) ----------------------------------------------

def _block_absmax(flat, blocksize):
    """Per-block max |x| of a 1-D float32 array; the last block may be short.

    Taken on the bit patterns (for non-negative floats their order is the integers' order): a
    CPU treating denormals as zero (see `_exact_float64`) would otherwise return any of a block of
    denormals, or 0."""
    magnitude = flat.view(np.uint32) & np.uint32(0x7FFFFFFF)
    full = flat.size - flat.size % blocksize
    absmax = magnitude[:full].reshape(-1, blocksize).max(axis=1) if full else np.empty(0, np.uint32)
    if full < flat.size:
        absmax = np.concatenate([absmax, [magnitude[full:].max()]])
    return absmax.astype(np.uint32).view(np.float32)


# bitsandbytes clamps a 4-bit block's absmax to at least 1e-38 before dividing by it (so a block of
# zeros codes 0 and a block of denormals is scaled by 1e38), and stores the clamped value for a
# short last block. 1e-38 is itself a float32 denormal.
_ABSMAX_FLOOR = np.float32(1e-38)
_DENORMAL_EXPONENT = np.uint32(0x7F800000)


def _exact_float64(values):
    """float32 -> float64 without loss, denormals included.

    Loading mindsft's fused CPU kernels (built with -ffast-math) switches the CPU to flush-to-zero
    and denormals-are-zero for the process: float32 denormals then read as 0 in any arithmetic,
    and 1 / 1e-38 divides by zero. Decoded from their bits, in float64 (where they are normal
    numbers), the values are what bitsandbytes computes with on a CPU in its default mode; a
    float32 product or quotient computed in float64 and rounded once equals the float32 one.
    """
    values = np.asarray(values, np.float32)
    out = values.astype(np.float64)
    bits = values.view(np.uint32)
    denormal = ((bits & _DENORMAL_EXPONENT) == 0) & ((bits & np.uint32(0x007FFFFF)) != 0)
    if denormal.any():
        mantissa = np.ldexp((bits[denormal] & np.uint32(0x007FFFFF)).astype(np.float64), -149)
        out[denormal] = np.where(bits[denormal] >> np.uint32(31), -mantissa, mantissa)
    return out


def _at_least_floor(absmax):
    """max(absmax, 1e-38) compared on the bits (denormals are not zero here)."""
    floor_bits = _ABSMAX_FLOOR.view(np.uint32)
    return np.where(absmax.view(np.uint32) < floor_bits, _ABSMAX_FLOOR, absmax).astype(np.float32)


def _has_denormals(values):
    bits = values.view(np.uint32) & np.uint32(0x7FFFFFFF)
    return bool(((bits != 0) & (bits < np.uint32(0x00800000))).any())


def _scaled_to_float32(scaled, values):
    """Scaled values in [-1, 1] (float64 or float32) as float32, keeping the sign of a nonzero value
    whose float32 is a denormal: flush-to-zero would make it 0, and FP4's code tells +0 from a tiny
    positive value (no other code boundary lies anywhere near a denormal, so the smallest normal
    of the same sign takes the same code). `values`: the unscaled float32 values."""
    rounded = scaled.astype(np.float32, copy=False)
    lost = (rounded.view(np.uint32) & np.uint32(0x7FFFFFFF)) < np.uint32(0x00800000)
    if lost.any():
        lost &= (values.view(np.uint32) & np.uint32(0x7FFFFFFF)) != 0
        rounded[lost] = np.copysign(np.finfo(np.float32).tiny, values[lost])
    return rounded


_LUT_SIZE = 65536


def _quantize_lut(code):
    """bitsandbytes' CPU lookup table: [-1, 1] cut into 65536 points, each mapped to the index
    of its nearest code entry (the lower one on a tie), as build_quantize_lut computes it."""
    midpoints = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    points = (np.float32(-1.0) + (np.float32(2.0) * np.arange(_LUT_SIZE, dtype=np.float32))
              / np.float32(_LUT_SIZE - 1)).astype(np.float32)
    # The code index advances past every midpoint strictly below the point.
    return np.searchsorted(midpoints, points, side="left").astype(np.uint8)


_DYNAMIC_LUT = None


def quantize_blockwise(values, blocksize=NESTED_BLOCK_SIZE):
    """(uint8 indices, float32 absmax per block): bitsandbytes' CPU `quantize_blockwise` with
    the dynamic code. Like bitsandbytes 0.50 on the CPU, a value is not matched to the code
    directly: value / absmax is rounded to one of 65536 points of [-1, 1] and the point's nearest
    code entry is taken (so an exact 0 may land on a code entry a few 1e-5 away)."""
    global _DYNAMIC_LUT
    if _DYNAMIC_LUT is None:
        _DYNAMIC_LUT = _quantize_lut(DYNAMIC_CODE)
    flat = np.asarray(values, np.float32).reshape(-1)
    absmax = _block_absmax(flat, blocksize)
    inverse = np.zeros_like(absmax)
    np.divide(np.float32(1.0), absmax, out=inverse, where=absmax != 0)
    normed = np.clip(flat * np.repeat(inverse, blocksize)[:flat.size], -1, 1).astype(np.float32)
    half = ((normed + np.float32(1.0)) * np.float32(0.5)).astype(np.float32)
    # (v + 1) · 0.5 · 65535 + 0.5 as one fused multiply-add (the library is built with FMA):
    # exact in float64, then rounded once to float32 and truncated.
    point = (half.astype(np.float64) * (_LUT_SIZE - 1) + 0.5).astype(np.float32).astype(np.int64)
    indices = _DYNAMIC_LUT[np.minimum(point, _LUT_SIZE - 1)]
    # A block of zeros is stored as index 0 with absmax 0.
    indices[np.repeat(absmax == 0, blocksize)[:flat.size]] = 0
    return indices, absmax


def dequantize_blockwise(indices, absmax, blocksize=NESTED_BLOCK_SIZE):
    """code value · block absmax in float32, as bitsandbytes' CPU `dequantize_blockwise`."""
    flat = np.asarray(indices).reshape(-1)
    return (DYNAMIC_CODE[flat] * np.repeat(np.asarray(absmax, np.float32), blocksize)[:flat.size]).astype(np.float32)


# ---- 4-bit ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Quantized4bit:
    """A 4-bit weight as bitsandbytes' `Params4bit` holds it (packed codes + `QuantState`)."""
    packed: np.ndarray                       # uint8 [ceil(numel / 2)], first value in the high nibble
    absmax: np.ndarray                       # float32 [blocks], or uint8 [blocks] when double-quantized
    shape: Tuple[int, ...]
    quant_type: str
    blocksize: int = BLOCK_SIZE
    offset: Optional[np.float32] = None      # double quantization: mean of the float32 absmax
    nested_absmax: Optional[np.ndarray] = None   # float32 [ceil(blocks / 256)]

    @property
    def double_quant(self):
        return self.nested_absmax is not None

    @property
    def nbytes(self):
        nested = self.nested_absmax.nbytes + 4 if self.double_quant else 0
        return self.packed.nbytes + self.absmax.nbytes + nested

    def block_scales(self):
        """The float32 absmax of every 64-block (the double quantization undone)."""
        if not self.double_quant:
            return self.absmax
        return dequantize_blockwise(self.absmax, self.nested_absmax) + np.float32(self.offset)


def _sorted_code(quant_type):
    """(midpoints between sorted code values, code index of each sorted position)."""
    code = CODES_4BIT[quant_type]
    # Stable, as torch.argsort happens to be here: FP4's +0 (index 0) sorts before its -0 (index 8).
    order = np.argsort(code, kind="stable")
    midpoints = ((code[order[:-1]] + code[order[1:]]) / np.float32(2)).astype(np.float32)
    return midpoints, order


# Values coded per pass: bounds the temporaries (float32 copies, int64 indices) to a few tens of MB.
_CHUNK_VALUES = 1 << 20


def _codes_4bit(scaled, quant_type):
    """uint8 code index of each scaled value: torch.bucketize over the sorted code's midpoints."""
    midpoints, order = _sorted_code(quant_type)
    return order[np.searchsorted(midpoints, scaled, side="left")].astype(np.uint8)


def quantize_4bit(weight, quant_type="nf4", double_quant=False, blocksize=BLOCK_SIZE):
    """bitsandbytes' `quantize_4bit(weight, blocksize, compress_statistics=double_quant, quant_type)`."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type {quant_type!r} is not one of {', '.join(QUANT_TYPES)}")
    weight = np.asarray(weight)
    flat = weight.astype(np.float32, copy=False).reshape(-1)
    n = flat.size
    full = n - n % blocksize
    absmax = _block_absmax(flat, blocksize)
    packed = np.empty((n + 1) // 2, np.uint8)
    chunk = max(blocksize, _CHUNK_VALUES - _CHUNK_VALUES % blocksize)
    for start in range(0, full, chunk):
        stop = min(start + chunk, full)
        # As bitsandbytes: full blocks are multiplied by the float32 1/absmax, a short last block
        # divided by its absmax (float64 here, rounded once: see _exact_float64).
        values = flat[start:stop].reshape(-1, blocksize)
        block_absmax = _at_least_floor(absmax[start // blocksize:stop // blocksize])
        if _has_denormals(block_absmax) or _has_denormals(values):
            inverse = (1.0 / _exact_float64(block_absmax)).astype(np.float32).astype(np.float64)
            scaled = _exact_float64(values) * inverse[:, None]
        else:
            # Normal numbers only: float32 is exact IEEE arithmetic here but for results below the
            # normal range, which _scaled_to_float32 mends (it takes float32 as it is).
            scaled = values * (np.float32(1.0) / block_absmax)[:, None]
        codes = _codes_4bit(_scaled_to_float32(np.clip(scaled, -1, 1).reshape(-1), values.reshape(-1)), quant_type)
        packed[start // 2:stop // 2] = (codes[0::2] << 4) | codes[1::2]
    if full < n:
        absmax[-1] = _at_least_floor(absmax[-1:])[0]
        scaled = np.zeros(n - full + (n - full) % 2, np.float64)
        scaled[:n - full] = np.clip(_exact_float64(flat[full:]) / _exact_float64(absmax[-1:])[0], -1, 1)
        codes = _codes_4bit(_scaled_to_float32(scaled, np.pad(flat[full:], (0, (n - full) % 2))), quant_type)
        packed[full // 2:] = (codes[0::2] << 4) | codes[1::2]
    result = Quantized4bit(packed=packed, absmax=absmax, shape=tuple(weight.shape), quant_type=quant_type,
                           blocksize=blocksize)
    if double_quant:
        result.absmax, result.offset, result.nested_absmax = double_quantize(absmax)
    return result


def double_quantize(absmax, offset=None):
    """(uint8 codes, offset, float32 nested absmax) of the float32 block absmax: the offset
    (their mean unless given) subtracted, then 8-bit blockwise in blocks of 256.

    The mean is the correctly rounded float32 mean. torch sums float32 in an order that
    depends on the CPU's vector width and thread count, so bitsandbytes' offset can be one
    unit in the last place away from it; given its offset, the rest is byte for byte the same.
    """
    absmax = np.asarray(absmax, np.float32)
    if offset is None:
        offset = np.float32(np.sum(absmax, dtype=np.float64) / absmax.size)
    offset = np.float32(offset)
    codes, nested_absmax = quantize_blockwise((absmax - offset).astype(np.float32), NESTED_BLOCK_SIZE)
    return codes, offset, nested_absmax


def double_quantize_stacked(parts):
    """4-bit parts of one stacked weight (Baichuan's W_pack: q, k and v stacked), each quantized
    alone without double quantization and a whole number of 64-blocks long, as bitsandbytes
    double-quantizes the stacked weight: its 64-blocks are the parts' own, but the offset is the
    mean of all their absmax and the 256-blocks of the absmax run on across the parts. A part
    whose absmax share a 256-block with another part's keeps them as the float32 values they
    dequantize to (4 bytes a block instead of 1), so its weight still dequantizes exactly."""
    absmax = np.concatenate([part.absmax for part in parts])
    codes, offset, nested_absmax = double_quantize(absmax)
    out, start = [], 0
    for part in parts:
        if part.double_quant or int(np.prod(part.shape)) % part.blocksize:
            raise ValueError("each part must be a whole number of blocks, quantized without double quantization")
        stop = start + part.absmax.size
        if start % NESTED_BLOCK_SIZE == 0 and (stop % NESTED_BLOCK_SIZE == 0 or stop == absmax.size):
            nested = nested_absmax[start // NESTED_BLOCK_SIZE:-(-stop // NESTED_BLOCK_SIZE)]
            out.append(dataclasses.replace(part, absmax=codes[start:stop], offset=offset, nested_absmax=nested))
        else:
            scales = (DYNAMIC_CODE[codes[start:stop]] * np.repeat(nested_absmax, NESTED_BLOCK_SIZE)[start:stop]
                      + offset).astype(np.float32)
            out.append(dataclasses.replace(part, absmax=scales))
        start = stop
    return out


def dequantize_4bit(quantized):
    """bitsandbytes' `dequantize_4bit`: code value · block absmax, in float32, in the weight's shape."""
    q = quantized
    code = CODES_4BIT[q.quant_type]
    indices = np.empty(q.packed.size * 2, np.uint8)
    indices[0::2] = q.packed >> 4
    indices[1::2] = q.packed & 0x0F
    n = int(np.prod(q.shape))
    values = code[indices[:n]]
    scales = np.repeat(q.block_scales(), q.blocksize)[:n]
    return (values * scales).astype(np.float32).reshape(q.shape)


# ---- 8-bit (LLM.int8 weights) -------------------------------------------------------------------

@dataclasses.dataclass
class QuantizedInt8:
    """An 8-bit weight as bitsandbytes' `Int8Params` holds it: `CB` codes and `SCB` row absmax."""
    codes: np.ndarray     # int8 [out, in]
    row_absmax: np.ndarray    # float32 [out]

    @property
    def shape(self):
        return tuple(self.codes.shape)

    @property
    def nbytes(self):
        return self.codes.nbytes + self.row_absmax.nbytes


def quantize_int8_rows(weight):
    """bitsandbytes' `Int8Params` quantization (`int8_vectorwise_quant` of the float16 weight)."""
    weight16 = np.asarray(weight).astype(np.float16).astype(np.float32)
    row_absmax = np.abs(weight16).max(axis=1).astype(np.float32)
    # torch evaluates `127.0 / row_stats` as reciprocal(row_stats) · 127, two roundings.
    factor = ((np.float32(1.0) / row_absmax).astype(np.float32) * np.float32(127.0)).astype(np.float32)
    codes = np.rint(weight16 * factor[:, None]).astype(np.int8)
    return QuantizedInt8(codes=codes, row_absmax=row_absmax)


def int8_row_scales(row_absmax):
    """Per-row dequantization factor SCB · (1/127) in float32, as bitsandbytes computes it."""
    return (np.asarray(row_absmax, np.float32) * np.float32(1.0 / 127.0)).astype(np.float32)


def dequantize_int8_rows(quantized):
    return (quantized.codes.astype(np.float32) * int8_row_scales(quantized.row_absmax)[:, None]).astype(np.float32)
