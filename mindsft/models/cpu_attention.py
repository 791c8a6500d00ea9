"""Fused causal attention for MindSpore's CPU backend, as a MindSpore "aot" custom op.

MindSpore's CPU kernels run attention as separate ops that each write [B, H, S, S] tensors
(scores, mask added, softmax, and their gradients): measured here, ~0.13 s per layer forward and
backward for batch 4 x 512 x 8 heads, against ~0.03 s for `cpu_attention.cc`, which keeps a
block of scores in cache and recomputes it in the backward pass from the saved log-sum-exp.

The C++ source is compiled once per machine with the system's g++ into a cache folder
(`$MINDSFT_KERNEL_CACHE`, default `~/.cache/mindsft/kernels`). Where there is no compiler, or the
build fails, `causal_attention()` returns None and the model keeps MindSpore's own ops (with one
log line saying why). `MINDSFT_CPU_ATTENTION=0` turns it off.
"""
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_attention.cc")
HEAD_DIMS = (8, 16, 32, 64, 128)  # the head sizes the kernel is instantiated for
FLAGS = ["-O3", "-march=native", "-ffast-math", "-std=c++17", "-shared", "-fPIC", "-pthread"]

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
        key = hashlib.sha256(f.read() + " ".join(FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    folder = os.environ.get("MINDSFT_KERNEL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mindsft",
                                                                     "kernels"))
    path = os.path.join(folder, f"cpu_attention-{key}.so")
    if os.path.isfile(path):
        return path, None
    os.makedirs(folder, exist_ok=True)
    # Built under a temporary name and renamed: msrun workers may build at the same time.
    fd, tmp = tempfile.mkstemp(prefix=".cpu_attention-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", tmp, SOURCE], capture_output=True, text=True)
        if done.returncode:
            return None, f"{compiler} failed: {done.stderr.strip()[-500:]}"
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path, None


def causal_attention(head_dim):
    """The op (q [B,H,S,D], k, v [B,Hkv,S,D]) -> (out [B,H,S,D], lse [B,H,S]), with its backward,
    for fp32 on CPU; None where it does not apply (then use MindSpore's ops)."""
    import mindspore as ms
    if os.environ.get("MINDSFT_CPU_ATTENTION", "1") == "0" or head_dim not in HEAD_DIMS:
        return None
    if ms.get_context("device_target") != "CPU":
        return None
    if "op" not in _OPS:
        # The kernel splits its work over as many threads as MindSpore's runtime uses.
        os.environ.setdefault("MINDSFT_ATTENTION_THREADS", str(ms.get_context("runtime_num_threads") or 0))
        try:
            path, why = library_path()
        except OSError as err:  # an unreadable source, a cache folder that cannot be written
            path, why = None, str(err)
        if path is None:
            logger.warning("mindsft: fused CPU attention unavailable (%s); using MindSpore's ops", why)
            _OPS["op"] = None
        else:
            _OPS["op"] = _make_ops(path)
    return _OPS["op"]


def _make_ops(path):
    from mindspore import ops

    backward = ops.Custom(f"{path}:CausalAttentionBackward", func_type="aot",
                          out_shape=lambda q, k, v, out, lse, dout: (q, k, v),
                          out_dtype=lambda q, k, v, out, lse, dout: (q, k, v))

    def bprop(q, k, v, out, dout):
        # Only `out` is used downstream; the log-sum-exp is kept for the backward pass alone.
        return backward(q, k, v, out[0], out[1], dout[0])

    return ops.Custom(f"{path}:CausalAttentionForward", func_type="aot", bprop=bprop,
                      out_shape=lambda q, k, v: (q, q[:3]), out_dtype=lambda q, k, v: (q, q))
