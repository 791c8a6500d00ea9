"""Fused CPU kernels for the model, the optimizer, decoding and dequantization: MindSpore "aot"
custom ops (`cpu_kernels.cc`) that make fewer passes over memory than MindSpore's CPU ops.

- The model: causal attention (also packed: attention within each sample) that keeps a block of
  scores in cache and recomputes it in the backward pass from the saved log-sum-exp, where
  MindSpore's ops each write [B, H, S, S] tensors; cross-entropy per row of logits, one read
  forward and one write of the gradient backward.
- The optimizer: the AdamW step of one parameter in one read of param, moments and gradient.
- Decoding: products of a few rows (batch x beams) that read the weight in place, where
  MindSpore's MatMul repacks it on every call; one decode step of attention per layer (rotary,
  the beams' cache reorder, the cache write, attention); beam search's candidates per row
  (log-softmax + beam score + top-k), so that the logits never travel to the host.
- Dequantization: a QLoRA base weight dequantized by one op that waits for its layer's input, so
  the runtime holds one layer's dequantized weight at a time, not every layer's from the start
  of the step.

The README's "CPU kernels" gives what they save, measured.

The C++ source is compiled once per machine with the system's g++ into a cache folder
(`$MINDSFT_KERNEL_CACHE`, default `~/.cache/mindsft/kernels`). Where there is no compiler, or the
build fails, the functions here return None and the model keeps MindSpore's own ops (with one log
line saying why). `MINDSFT_CPU_KERNELS=0` turns them off.
"""
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cc")
# The head sizes the attention kernel serves. Measured on 2 cores: at head size 16 MindSpore's
# own ops are faster (a 2-layer, seq 256 step: 18 ms against 23 ms); from 32 on the kernel wins
# (seq 256: 25 ms against 30 ms; the 20M benchmark Llama: 0.13 s less per step).
HEAD_DIMS = (32, 64, 128)
# -ffast-math lets exp vectorize: without it the cross-entropy measured slower than MindSpore's
# log_softmax + gather (0.29 s against 0.25 s), and the training step lost all its gain.
FLAGS = ["-O3", "-march=native", "-ffast-math", "-std=c++17", "-fPIC", "-pthread"]
# Linked in a second step without -ffast-math: gcc before 13 links crtfastmath.o into a library
# linked with it, whose constructor turns on flush-to-zero for the whole process the moment the
# library loads, so every later numpy/torch result with a denormal would silently change.
LINK_FLAGS = ["-shared", "-fPIC", "-pthread"]
# Up to this many rows a linear layer runs through `few_rows_linear` (a decode step: batch x beams);
# MindSpore's MatMul repacks the weight each call, a cost that more rows amortize.
FEW_ROWS = 8

logger = logging.getLogger(__name__)
_OPS = {}


def _cpu_signature():
    """What -march=native depends on: a library built on one CPU may not run on another that
    shares the cache folder (a cluster's home directory)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def library_path():
    """The compiled kernel library, building it first if this machine has none; None if it cannot."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return None, "no C++ compiler (g++) on PATH"
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + " ".join(FLAGS + LINK_FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    folder = os.environ.get("MINDSFT_KERNEL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mindsft",
                                                                     "kernels"))
    path = os.path.join(folder, f"cpu_kernels-{key}.so")
    if os.path.isfile(path):
        return path, None
    os.makedirs(folder, exist_ok=True)
    # Built under a temporary name and renamed: msrun workers may build at the same time.
    fd, tmp = tempfile.mkstemp(prefix=".cpu_kernels-", suffix=".so", dir=folder)
    os.close(fd)
    obj = tmp[:-len(".so")] + ".o"
    try:
        for command in ([compiler, *FLAGS, "-c", "-o", obj, SOURCE], [compiler, *LINK_FLAGS, "-o", tmp, obj]):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                return None, f"{compiler} failed: {done.stderr.strip()[-500:]}"
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, obj):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return path, None


def _kernel_library():
    """Path of the built library for fp32 on CPU, or None (kernels off, another device, no build)."""
    import mindspore as ms
    if os.environ.get("MINDSFT_CPU_KERNELS", "1") == "0" or ms.get_context("device_target") != "CPU":
        return None
    if "path" not in _OPS:
        # The kernels split their work over as many threads as MindSpore's runtime uses.
        os.environ.setdefault("MINDSFT_KERNEL_THREADS", str(ms.get_context("runtime_num_threads") or 0))
        try:
            path, why = library_path()
        except OSError as err:  # an unreadable source, a cache folder that cannot be written
            path, why = None, str(err)
        if path is None:
            logger.warning("mindsft: fused CPU kernels unavailable (%s); using MindSpore's ops", why)
        _OPS["path"] = path
    return _OPS["path"]


def causal_attention(head_dim):
    """The op (q [B,H,S,D], k, v [B,Hkv,S,D]) -> (out [B,H,S,D], lse [B,H,S]), with its backward,
    for fp32 on CPU; None where it does not apply (then use MindSpore's ops)."""
    path = _kernel_library() if head_dim in HEAD_DIMS else None
    if path is None:
        return None
    if "attention" not in _OPS:
        from mindspore import ops
        backward = ops.Custom(f"{path}:CausalAttentionBackward", func_type="aot",
                              out_shape=lambda q, k, v, out, lse, dout: (q, k, v),
                              out_dtype=lambda q, k, v, out, lse, dout: (q, k, v))

        def bprop(q, k, v, out, dout):
            # Only `out` is used downstream; the log-sum-exp is kept for the backward pass alone.
            return backward(q, k, v, out[0], out[1], dout[0])

        _OPS["attention"] = ops.Custom(f"{path}:CausalAttentionForward", func_type="aot", bprop=bprop,
                                       out_shape=lambda q, k, v: (q, q[:3]), out_dtype=lambda q, k, v: (q, q))
    return _OPS["attention"]


def packed_attention(head_dim):
    """Like `causal_attention`, with one more input ends [B, K] int32 (the samples' cumulative end
    offsets in each row, `actual_seq_len`): each query attends only within its own sample."""
    path = _kernel_library() if head_dim in HEAD_DIMS else None
    if path is None:
        return None
    if "packed_attention" not in _OPS:
        from mindspore import ops
        backward = ops.Custom(f"{path}:PackedAttentionBackward", func_type="aot",
                              out_shape=lambda q, k, v, ends, out, lse, dout: (q, k, v),
                              out_dtype=lambda q, k, v, ends, out, lse, dout: (q, k, v))

        def bprop(q, k, v, ends, out, dout):
            return backward(q, k, v, ends, out[0], out[1], dout[0]) + (ops.zeros_like(ends),)

        _OPS["packed_attention"] = ops.Custom(f"{path}:PackedAttentionForward", func_type="aot", bprop=bprop,
                                              out_shape=lambda q, k, v, ends: (q, q[:3]),
                                              out_dtype=lambda q, k, v, ends: (q, q))
    return _OPS["packed_attention"]


def cross_entropy():
    """The op (logits [N, V] fp32, targets [N] int32) -> (loss [N], lse [N]); a negative target
    is not learned (loss 0, no gradient). None where it does not apply."""
    path = _kernel_library()
    if path is None:
        return None
    if "cross_entropy" not in _OPS:
        from mindspore import ops
        backward = cross_entropy_backward()

        def bprop(logits, targets, out, dout):
            return backward(logits, targets, out[1], dout[0]), ops.zeros_like(targets)

        _OPS["cross_entropy"] = ops.Custom(f"{path}:CrossEntropyForward", func_type="aot", bprop=bprop,
                                           out_shape=lambda logits, targets: (targets, targets),
                                           out_dtype=lambda logits, targets: (logits, logits))
    return _OPS["cross_entropy"]


def cross_entropy_backward():
    """The op (logits [N, V], targets [N], lse [N], dloss [N]) -> dlogits [N, V] of `cross_entropy`
    (for a caller that recomputes the logits in its own backward); None where it does not apply."""
    path = _kernel_library()
    if path is None:
        return None
    if "cross_entropy_backward" not in _OPS:
        from mindspore import ops
        _OPS["cross_entropy_backward"] = ops.Custom(f"{path}:CrossEntropyBackward", func_type="aot",
                                                    out_shape=lambda logits, targets, lse, dloss: logits,
                                                    out_dtype=lambda logits, targets, lse, dloss: logits)
    return _OPS["cross_entropy_backward"]


def adamw_step():
    """The op (param, m, v, grad, hyper [lr, grad scale, beta1, beta2, eps, decay]) ->
    (next param, next m, next v), all fp32 (no gradient); None where it does not apply."""
    path = _kernel_library()
    if path is None:
        return None
    if "adamw" not in _OPS:
        from mindspore import ops
        _OPS["adamw"] = ops.Custom(f"{path}:AdamWeightDecayStep", func_type="aot",
                                   out_shape=lambda p, m, v, g, h: (p, p, p), out_dtype=lambda p, m, v, g, h: (p, p, p))
    return _OPS["adamw"]


def dequantize(kind, weight_shape):
    """The op that dequantizes one QLoRA base weight into float32 `weight_shape` (kind:
    Dequantize4bit, Dequantize4bitNested or Dequantize8bit; inputs as cpu_kernels.cc lists them,
    the last an activation to wait for; no gradient). None where the kernels do not apply."""
    path = _kernel_library()
    if path is None:
        return None
    import mindspore as ms
    from mindspore import ops
    shape = tuple(int(d) for d in weight_shape)
    op = ops.Custom(f"{path}:{kind}", func_type="aot", out_shape=lambda *inputs: shape,
                    out_dtype=lambda *inputs: ms.float32)
    # Weights of different shapes can have same-shaped inputs (q_proj and o_proj): the attribute
    # keeps MindSpore from reusing one's inferred output shape for the other.
    op.add_prim_attr("weight_shape", shape)
    return op


def few_rows_linear():
    """The op (x [M, K], w [N, K]) -> x · wᵀ [M, N], fp32, for the few rows of a decode step
    (`FEW_ROWS` or fewer), with its backward; None where the kernels do not apply."""
    path = _kernel_library()
    if path is None:
        return None
    if "few_rows_linear" not in _OPS:
        from mindspore import ops
        matmul = ops.MatMul()
        matmul_ta = ops.MatMul(transpose_a=True)

        def bprop(x, w, out, dout):
            return matmul(dout, w), matmul_ta(dout, x)

        _OPS["few_rows_linear"] = ops.Custom(f"{path}:FewRowsLinear", func_type="aot", bprop=bprop,
                                             out_shape=lambda x, w: (x[0], w[0]), out_dtype=lambda x, w: x)
    return _OPS["few_rows_linear"]


def beam_top_k(k):
    """The op (logits [R, V], scores [R]) -> (totals [R, k] float32, tokens [R, k] int32): per row,
    the k best of log_softmax(logits) + score, best first, ties to the lower token (beam search's
    candidates, without sending the logits to the host); None where the kernels do not apply."""
    path = _kernel_library()
    if path is None:
        return None
    key = ("beam_top_k", int(k))
    if key not in _OPS:
        import mindspore as ms
        from mindspore import ops
        op = ops.Custom(f"{path}:BeamTopK", func_type="aot",
                        out_shape=lambda logits, scores: ((logits[0], int(k)), (logits[0], int(k))),
                        out_dtype=lambda logits, scores: (ms.float32, ms.int32))
        # Ops of different k over same-shaped inputs: the attribute keeps their inferred shapes apart.
        op.add_prim_attr("k", int(k))
        _OPS[key] = op
    return _OPS[key]


def decode_attention():
    """The op (q [R, H·D], k, v [R, Hkv·D], cos, sin [R, D], mask [R, T] additive, slot [1],
    rows [R] int32, key_cache, value_cache [R, Hkv, T, D]) -> (out [R, H·D], key_cache,
    value_cache): one decode step of attention (rotary, queries scaled by 1/sqrt(D), each row's
    cache taken from row rows[r], the new key/value written at `slot`), fp32, no gradient.
    A decode step otherwise runs ~25 small MindSpore ops per layer for it. None where the
    kernels do not apply."""
    path = _kernel_library()
    if path is None:
        return None
    if "decode_attention" not in _OPS:
        from mindspore import ops
        _OPS["decode_attention"] = ops.Custom(
            f"{path}:DecodeAttention", func_type="aot",
            out_shape=lambda q, k, v, cos, sin, mask, slot, rows, key_cache, value_cache: (q, key_cache, value_cache),
            out_dtype=lambda q, k, v, cos, sin, mask, slot, rows, key_cache, value_cache: (q, q, q))
    return _OPS["decode_attention"]


def rms_norm_rows():
    """The op (x [..., D], weight [D], eps [1]) -> RMSNorm(x) · weight, fp32, no gradient: a decode
    step's norms (MindSpore's ops run it as ~7 small ops). None where the kernels do not apply."""
    path = _kernel_library()
    if path is None:
        return None
    if "rms_norm_rows" not in _OPS:
        from mindspore import ops
        _OPS["rms_norm_rows"] = ops.Custom(f"{path}:RmsNormRows", func_type="aot",
                                           out_shape=lambda x, weight, eps: x, out_dtype=lambda x, weight, eps: x)
    return _OPS["rms_norm_rows"]
