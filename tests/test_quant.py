"""mindsft.quant stores a weight exactly as bitsandbytes does: 4-bit NF4/FP4 codes, absmax and
double-quantized statistics byte for byte, dequantized values equal, LLM.int8 rows likewise."""
import contextlib
import warnings

import numpy as np
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb_functional  # noqa: E402

from mindsft import quant  # noqa: E402

# Odd sizes on purpose: a short last 64-block, an odd element count, more than one 256-block of
# absmax, more values than quant.py codes in one pass.
SHAPES = [(96, 200), (33, 35), (257, 64), (384, 704), (1031, 1090)]


def denormals_flushed():
    """Whether the CPU flushes denormals to zero now (loading mindsft's fused kernels turns it on)."""
    return float(np.array([1], np.uint32).view(np.float32)[0] * np.float32(2.0)) == 0.0


@contextlib.contextmanager
def flush_denormals(mode):
    """The calling thread's flush-to-zero and denormals-are-zero modes (torch sets both), restored after."""
    was = denormals_flushed()
    torch.set_flush_denormal(mode)
    try:
        yield
    finally:
        torch.set_flush_denormal(was)


@pytest.fixture(autouse=True)
def default_float_mode():
    """bitsandbytes' references are computed in the CPU's default mode, whatever ran before."""
    with flush_denormals(False):
        yield


def weight_of(shape, seed=0):
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    weight.reshape(-1)[:64] = 0.0        # a block of zeros
    weight.reshape(-1)[100] = 0.7        # an outlier dominating its block
    return weight


def test_code_tables_are_bitsandbytes_own():
    for quant_type in quant.QUANT_TYPES:
        assert np.array_equal(quant.CODES_4BIT[quant_type], bnb_functional.get_4bit_type(quant_type, "cpu").numpy())
    assert np.array_equal(quant.DYNAMIC_CODE, bnb_functional.create_dynamic_map().numpy())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_codes_and_absmax_equal_bitsandbytes_byte_for_byte(shape, quant_type):
    weight = weight_of(shape)
    packed, state = bnb_functional.quantize_4bit(torch.from_numpy(weight), blocksize=64, quant_type=quant_type,
                                                 compress_statistics=False)
    ours = quant.quantize_4bit(weight, quant_type, double_quant=False)
    assert ours.packed.tobytes() == packed.numpy().tobytes()
    assert ours.absmax.tobytes() == state.absmax.numpy().tobytes()
    assert np.array_equal(quant.dequantize_4bit(ours), bnb_functional.dequantize_4bit(packed, state).numpy())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quantized_statistics_equal_bitsandbytes_byte_for_byte(shape, quant_type):
    weight = weight_of(shape, seed=1)
    packed, state = bnb_functional.quantize_4bit(torch.from_numpy(weight), blocksize=64, quant_type=quant_type,
                                                 compress_statistics=True)
    ours = quant.quantize_4bit(weight, quant_type, double_quant=True)
    assert ours.packed.tobytes() == packed.numpy().tobytes()
    # The offset is the mean of the absmax; torch's float32 summation order may put its mean
    # one unit in the last place away from ours (the correctly rounded one).
    assert abs(float(ours.offset) - state.offset.item()) <= np.spacing(np.float32(ours.offset))
    plain = quant.quantize_4bit(weight, quant_type, double_quant=False)
    codes, offset, nested = quant.double_quantize(plain.absmax, offset=state.offset.item())
    assert codes.tobytes() == state.absmax.numpy().tobytes()
    assert nested.tobytes() == state.state2.absmax.numpy().tobytes()
    assert state.state2.blocksize == quant.NESTED_BLOCK_SIZE
    assert np.array_equal(state.state2.code.numpy(), quant.DYNAMIC_CODE)
    ours.absmax, ours.offset, ours.nested_absmax = codes, offset, nested
    assert np.array_equal(quant.dequantize_4bit(ours), bnb_functional.dequantize_4bit(packed, state).numpy())


def test_8bit_blockwise_matches_bitsandbytes_cpu_lookup_table_on_a_million_values():
    rng = np.random.default_rng(2)
    values = (rng.standard_normal(1_000_000) * rng.uniform(0, 3, 1_000_000)).astype(np.float32)
    values[256:512] = 0.0
    codes, state = bnb_functional.quantize_blockwise(torch.from_numpy(values), blocksize=256)
    ours, absmax = quant.quantize_blockwise(values, 256)
    assert ours.tobytes() == codes.numpy().tobytes()
    assert absmax.tobytes() == state.absmax.numpy().tobytes()
    assert np.array_equal(quant.dequantize_blockwise(ours, absmax), bnb_functional.dequantize_blockwise(codes, state).numpy())


def test_int8_rows_equal_bitsandbytes_int8params():
    weight = weight_of((300, 200), seed=3)
    weight[5, 9] = 3.0   # an outlier: LLM.int8 keeps it in its row's scale, there is no weight threshold
    params = bnb.nn.Int8Params(torch.from_numpy(weight), requires_grad=False, has_fp16_weights=False)._quantize("cpu")
    ours = quant.quantize_int8_rows(weight)
    assert ours.codes.tobytes() == params.data.numpy().tobytes()
    assert ours.row_absmax.tobytes() == params.SCB.numpy().tobytes()
    # What bitsandbytes' CPU training path (MatMul8bitFp) multiplies by.
    dequantized = params.data.to(torch.float32).mul_(params.SCB.unsqueeze(1).mul(1.0 / 127.0)).numpy()
    assert np.array_equal(quant.dequantize_int8_rows(ours), dequantized)


def test_quantized_sizes():
    weight = weight_of((256, 512))
    assert quant.quantize_4bit(weight, "nf4").nbytes == 256 * 512 // 2 + 256 * 512 // 64 * 4
    nested = quant.quantize_4bit(weight, "nf4", double_quant=True)
    assert nested.nbytes == 256 * 512 // 2 + 256 * 512 // 64 + 4 * 8 + 4
    assert quant.quantize_int8_rows(weight).nbytes == 256 * 512 + 256 * 4


def denormals(count, rng, below=1 << 23):
    """float32 denormals of both signs, built from their bits (a float conversion could flush them)."""
    bits = rng.integers(1, below, count).astype(np.uint32) | (rng.integers(0, 2, count).astype(np.uint32) << 31)
    return bits.view(np.float32)


@pytest.mark.parametrize("flushed", [False, True], ids=["default_mode", "flush_to_zero"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_zero_and_denormal_blocks_code_as_bitsandbytes_codes_them_without_warnings(quant_type, flushed):
    rng = np.random.default_rng(4)
    floor_bits = int(np.float32(1e-38).view(np.uint32))
    weight = np.concatenate([
        np.zeros(64, np.float32),                           # absmax 0: bitsandbytes divides by 1e-38 instead
        -np.zeros(64, np.float32),
        denormals(64, rng),                                 # denormals, some above the 1e-38 floor
        denormals(64, rng, below=floor_bits),               # all below it: scaled by 1 / 1e-38
        np.concatenate([[np.float32(2.0 ** -120)], denormals(63, rng)]),  # a normal absmax, denormal values
        (rng.standard_normal(64) * 0.02).astype(np.float32),
        np.zeros(10, np.float32),                           # a short last block of zeros: absmax stored as 1e-38
    ]).astype(np.float32)
    tail_of_denormals = np.concatenate([weight[:128], denormals(21, rng)])
    for case in (weight, tail_of_denormals):
        packed, state = bnb_functional.quantize_4bit(torch.from_numpy(case.copy()), blocksize=64,
                                                     quant_type=quant_type, compress_statistics=False)
        with flush_denormals(flushed), warnings.catch_warnings():
            warnings.simplefilter("error")
            ours = quant.quantize_4bit(case, quant_type, double_quant=False)
        assert ours.packed.tobytes() == packed.numpy().tobytes()
        assert ours.absmax.tobytes() == state.absmax.numpy().tobytes()
        assert np.array_equal(quant.dequantize_4bit(ours), bnb_functional.dequantize_4bit(packed, state).numpy().reshape(-1))
    # The case is not vacuous: codes of denormals differ from codes of zeros.
    assert len(set(ours.packed[64:96].tolist())) > 1
