"""Linear layers whose frozen weight is held quantized (QLoRA's base) and dequantized inside the
compiled step, one projection at a time, just before its matrix product.

The stored tensors are bitsandbytes' (see mindsft/quant.py), as frozen Parameters:
4-bit: `weight` (uint8, two codes a byte, high nibble first), `absmax` (float32 per 64-block, or
uint8 codes with `nested_absmax` and `offset` when double-quantized); 8-bit: `weight` (int8) and
`SCB` (float32 row absmax). The dequantized float32 weight lives only while its product runs:
the backward pass dequantizes it again (a custom bprop) instead of keeping every layer's
float32 weight from the forward pass, which would rebuild the full-precision model in memory.
On the CPU one fused kernel (cpu_kernels.dequantize) does the dequantization, made to wait for
the layer's input; elsewhere MindSpore's ops do it.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mindsft import quant
from mindsft import cpu_kernels


def _frozen(array, name):
    return Parameter(Tensor(np.ascontiguousarray(array)), name=name, requires_grad=False)


class QuantizedLinear(nn.Cell):
    """y = x · Wᵀ, W [out, in] frozen and dequantized on the fly; subclasses say how."""

    def __init__(self, in_features, out_features, compute_dtype):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.matmul = ops.MatMul(transpose_b=True)
        self.matmul_plain = ops.MatMul()
        self.has_bias = False

    def keep_bias(self, bias):
        """Add `bias` (a frozen Parameter) to the product: bitsandbytes keeps a bias unquantized."""
        self.bias = bias
        self.has_bias = True

    def construct(self, x):
        out_shape = x.shape[:-1] + (self.out_features,)
        flat = ops.reshape(x.astype(self.compute_dtype), (-1, self.in_features))
        y = self.matmul(flat, self.dequantize(flat).astype(self.compute_dtype))
        if self.has_bias:
            y = y + self.bias.astype(self.compute_dtype)
        return ops.reshape(y, out_shape)

    def bprop(self, x, out, dout):
        # Waits for dout: not merged with the forward pass's dequantization, nor run ahead of time.
        weight = self.dequantize(dout).astype(self.compute_dtype)
        grad = self.matmul_plain(ops.reshape(dout.astype(self.compute_dtype), (-1, self.out_features)), weight)
        return (ops.reshape(grad, x.shape).astype(x.dtype),)

    def quantized_bytes(self):
        return sum(int(p.size) * p.itemsize for p in self.get_parameters())


class Linear4bit(QuantizedLinear):
    """bitsandbytes' Linear4bit: NF4/FP4 codes in blocks of 64, absmax per block (optionally
    double-quantized)."""

    def __init__(self, quantized, compute_dtype=ms.float32):
        out_features, in_features = quantized.shape
        super().__init__(in_features, out_features, compute_dtype)
        self.quant_type = quantized.quant_type
        self.double_quant = quantized.double_quant
        numel = out_features * in_features
        blocksize = quantized.blocksize
        self.blocks = -(-numel // blocksize)
        # A short last block is padded to a whole one (zero codes), and cut off after dequantizing.
        self.padded = self.blocks * blocksize != numel
        packed = np.zeros(self.blocks * blocksize // 2, np.uint8)
        packed[:quantized.packed.size] = quantized.packed
        self.weight = _frozen(packed.reshape(self.blocks, blocksize // 2), "weight")
        code = quant.CODES_4BIT[quantized.quant_type]
        byte = np.arange(256)
        # The two code values of every byte (high nibble, low nibble): one gather per byte.
        self.code_pairs = Tensor(np.stack([code[byte >> 4], code[byte & 0x0F]], axis=1).astype(np.float32))
        self.blocksize = blocksize
        self.code = Tensor(code)
        self.fused_dequantize = cpu_kernels.dequantize(
            "Dequantize4bitNested" if self.double_quant else "Dequantize4bit", quantized.shape)
        self.fused = self.fused_dequantize is not None
        if self.double_quant:
            nested_blocks = quantized.nested_absmax.size
            absmax = np.zeros(nested_blocks * quant.NESTED_BLOCK_SIZE, np.uint8)
            absmax[:quantized.absmax.size] = quantized.absmax
            self.absmax = _frozen(absmax.reshape(nested_blocks, quant.NESTED_BLOCK_SIZE), "absmax")
            self.nested_absmax = _frozen(quantized.nested_absmax.reshape(nested_blocks, 1), "nested_absmax")
            self.offset = _frozen(np.array([quantized.offset], np.float32), "offset")
            self.dynamic_code = Tensor(quant.DYNAMIC_CODE)
        else:
            self.absmax = _frozen(quantized.absmax.reshape(self.blocks, 1), "absmax")

    def block_scales(self):
        """float32 [blocks, 1]: each 64-block's absmax (undoing the double quantization)."""
        if self.double_quant:
            codes = ops.gather(self.dynamic_code, self.absmax.astype(ms.int32), 0)
            scales = (codes * self.nested_absmax).reshape(-1)[:self.blocks] + self.offset
            return scales.reshape(self.blocks, 1)
        return self.absmax

    def dequantize(self, wait_for):
        """The float32 [out, in] weight, computed once `wait_for` is (with the fused kernel)."""
        if self.fused:
            if self.double_quant:
                return self.fused_dequantize(self.weight, self.absmax, self.nested_absmax, self.offset,
                                             self.dynamic_code, self.code, wait_for)
            return self.fused_dequantize(self.weight, self.absmax, self.code, wait_for)
        values = ops.gather(self.code_pairs, self.weight.astype(ms.int32), 0)
        weight = values.reshape(self.blocks, self.blocksize) * self.block_scales()
        if self.padded:
            return weight.reshape(-1)[:self.out_features * self.in_features].reshape(
                self.out_features, self.in_features)
        return weight.reshape(self.out_features, self.in_features)


class Linear8bit(QuantizedLinear):
    """bitsandbytes' Linear8bitLt weights (LLM.int8): int8 rows and their float32 absmax `SCB`."""

    def __init__(self, quantized, compute_dtype=ms.float32):
        out_features, in_features = quantized.shape
        super().__init__(in_features, out_features, compute_dtype)
        self.weight = _frozen(quantized.codes, "weight")
        self.SCB = _frozen(quantized.row_absmax.reshape(out_features, 1), "SCB")
        self.fused_dequantize = cpu_kernels.dequantize("Dequantize8bit", quantized.shape)
        self.fused = self.fused_dequantize is not None

    def dequantize(self, wait_for):
        if self.fused:
            return self.fused_dequantize(self.weight, self.SCB, wait_for)
        # codes · (SCB · 1/127), the order bitsandbytes multiplies in.
        return self.weight.astype(ms.float32) * (self.SCB * (1.0 / 127.0))


def quantized_linear(weight, bits, quant_type="nf4", double_quant=True, compute_dtype=ms.float32):
    """A quantized linear cell for a float [out, in] weight array."""
    if bits == 4:
        return Linear4bit(quant.quantize_4bit(weight, quant_type, double_quant), compute_dtype)
    if bits == 8:
        return Linear8bit(quant.quantize_int8_rows(weight), compute_dtype)
    raise ValueError(f"quantization_bit {bits!r} is not 4 or 8")
