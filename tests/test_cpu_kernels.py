"""The fused CPU kernels (causal attention, cross-entropy) compute what MindSpore's own ops compute,
forward and backward; without a compiler the model falls back to those ops."""
import os
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindsft import cpu_kernels
from mindsft.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss_terms


class Reference(nn.Cell):
    """Causal attention with MindSpore's ops: repeated key/value heads, additive mask, softmax."""

    def __init__(self, rep, seq):
        super().__init__()
        self.rep = rep
        self.mask = Tensor(np.triu(np.full((seq, seq), -1e30, np.float32), 1)[None, None])

    def construct(self, q, k, v, weight):
        k = ops.repeat_interleave(k, self.rep, 1)
        v = ops.repeat_interleave(v, self.rep, 1)
        probs = ops.softmax(ops.matmul(q, k.transpose(0, 1, 3, 2)) + self.mask, -1)
        return (ops.matmul(probs, v) * weight).sum()


class Fused(nn.Cell):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def construct(self, q, k, v, weight):
        out, _ = self.op(q, k, v)
        return (out * weight).sum()


@pytest.mark.parametrize("batch, heads, kv_heads, seq, head_dim", [
    (2, 4, 4, 37, 32),   # a sequence that fills no block evenly
    (1, 8, 2, 64, 64),   # grouped key/value heads
    (2, 2, 1, 5, 32),    # shorter than one block
])
def test_forward_and_gradients_equal_mindspores_attention(batch, heads, kv_heads, seq, head_dim):
    op = cpu_kernels.causal_attention(head_dim)
    assert op is not None, "g++ is needed to build the fused kernel"
    rng = np.random.default_rng(seq)
    q = Tensor(rng.standard_normal((batch, heads, seq, head_dim)).astype(np.float32) * 0.5)
    k = Tensor(rng.standard_normal((batch, kv_heads, seq, head_dim)).astype(np.float32))
    v = Tensor(rng.standard_normal((batch, kv_heads, seq, head_dim)).astype(np.float32))
    weight = Tensor(rng.standard_normal((batch, heads, seq, head_dim)).astype(np.float32))
    results = []
    for net in (Reference(heads // kv_heads, seq), Fused(op)):
        value, grads = ms.jit(ms.value_and_grad(net, grad_position=(0, 1, 2)))(q, k, v, weight)
        results.append((value.asnumpy(), [g.asnumpy() for g in grads]))
    (ref_value, ref_grads), (value, grads) = results
    assert abs(value - ref_value) <= 1e-5 * max(1.0, abs(ref_value))
    for got, expected in zip(grads, ref_grads):
        assert np.abs(got - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("ignore_index", [-100, 7])
def test_cross_entropy_and_its_gradient_equal_log_softmax(ignore_index):
    op = cpu_kernels.cross_entropy()
    assert op is not None, "g++ is needed to build the fused kernel"
    rng = np.random.default_rng(3)
    logits = Tensor((rng.standard_normal((3, 11, 50)) * 4).astype(np.float32))
    targets = rng.integers(0, 50, (3, 11)).astype(np.int32)
    targets[0, :4] = ignore_index
    targets = Tensor(targets)
    results = []
    for fused in (None, op):
        def loss(x, fused=fused):
            total, count = causal_lm_loss_terms(x, targets, ignore_index, fused)
            return total / count
        value, grad = ms.value_and_grad(loss)(logits)
        results.append((float(value.asnumpy()), grad.asnumpy()))
    (ref_value, ref_grad), (value, grad) = results
    assert abs(value - ref_value) <= 1e-5 * abs(ref_value)
    assert np.abs(grad - ref_grad).max() <= 1e-6
    assert not grad[0, :4].any()  # tokens not learned get no gradient


def tiny_model(seed=0):
    config = LlamaConfig(vocab_size=64, hidden_size=128, num_layers=2, num_heads=4, n_kv_heads=2,
                         intermediate_size=96, seq_length=24)
    ms.set_seed(seed)
    return LlamaForCausalLM(config)


def loss_and_grads(model, input_ids, labels):
    def loss(x, y):
        total, count = model.loss_terms(x, y)
        return total / count
    value, grads = ms.jit(ms.value_and_grad(loss, None, model.trainable_params()))(input_ids, labels)
    return float(value.asnumpy()), [g.asnumpy() for g in grads]


def test_the_model_trains_the_same_with_and_without_the_kernel(monkeypatch):
    rng = np.random.default_rng(1)
    input_ids = Tensor(rng.integers(3, 64, (2, 24)).astype(np.int32))
    labels = Tensor(np.where(rng.random((2, 24)) < 0.3, -100, input_ids.asnumpy()).astype(np.int32))
    fused = tiny_model()
    assert fused.model.fused_causal and fused.fused_cross_entropy is not None
    monkeypatch.setenv("MINDSFT_CPU_KERNELS", "0")
    plain = tiny_model()
    assert not plain.model.fused_causal and plain.fused_cross_entropy is None
    ms.load_param_into_net(plain, {p.name: p for p in fused.get_parameters()})
    (fused_loss, fused_grads), (plain_loss, plain_grads) = (loss_and_grads(m, input_ids, labels)
                                                             for m in (fused, plain))
    assert abs(fused_loss - plain_loss) < 1e-5
    for got, expected in zip(fused_grads, plain_grads):
        assert np.abs(got - expected).max() <= 1e-4 * max(1e-3, np.abs(expected).max())


def test_without_a_compiler_the_model_keeps_mindspores_ops(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_kernels, "_OPS", {})
    monkeypatch.setenv("MINDSFT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert cpu_kernels.causal_attention(32) is None and cpu_kernels.cross_entropy() is None
    assert "no C++ compiler" in caplog.text
    model = tiny_model()
    assert not model.model.fused_causal
    logits = model(Tensor(np.arange(3, 27, dtype=np.int32).reshape(1, 24)))
    assert logits.shape == (1, 24, 64) and np.isfinite(logits.asnumpy()).all()
    assert not list(tmp_path.iterdir())  # nothing half-built left behind


def adamw_after_steps(steps, weight_decay):
    from mindsft.train.step import AdamWUpdate
    rng = np.random.default_rng(5)
    params = [ms.Parameter(Tensor(rng.standard_normal(shape).astype(np.float32)), name=f"p{i}")
              for i, shape in enumerate([(33, 17), (17,)])]
    update = AdamWUpdate(params, 0.9, 0.95, 1e-8, weight_decay)
    for _ in range(steps):
        grads = tuple(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 1e-3) for p in params)
        update(grads, Tensor(1e-2, ms.float32), Tensor(True))
    return update, [p.asnumpy() for p in params] + [m.asnumpy() for m in update.moments_m + update.moments_v]


def test_the_fused_adamw_step_equals_the_op_by_op_update(monkeypatch):
    fused, fused_values = adamw_after_steps(3, weight_decay=0.1)
    assert fused.fused is not None
    monkeypatch.setenv("MINDSFT_CPU_KERNELS", "0")
    plain, plain_values = adamw_after_steps(3, weight_decay=0.1)
    assert plain.fused is None
    for got, expected in zip(fused_values, plain_values):
        assert np.abs(got - expected).max() <= 1e-6 * max(1e-3, np.abs(expected).max())


def test_loading_the_kernels_leaves_the_process_float_mode_alone(tmp_path):
    """A library linked with -ffast-math (gcc < 13) switches the whole process to flush-to-zero when
    it loads, silently changing every later numpy/torch result that meets a denormal."""
    import subprocess
    import sys
    script = ("import ctypes, numpy as np\n"
              "from mindsft.cpu_kernels import library_path\n"
              "path, why = library_path()\n"
              "assert path, why\n"
              "ctypes.CDLL(path)\n"
              "print(float((np.array([1e-39], np.float32) * np.float32(1.0))[0]))\n")
    env = dict(os.environ, MINDSFT_KERNEL_CACHE=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) > 0.0


@pytest.mark.parametrize("rows, in_features, out_features", [
    (1, 64, 256),    # one decode row
    (4, 37, 131),    # beams; sizes that fill no vector or block of weight rows evenly
    (7, 1365, 9),    # more rows than one group of four
])
def test_few_rows_linear_equals_matmul_forward_and_backward(rows, in_features, out_features):
    op = cpu_kernels.few_rows_linear()
    if op is None:
        pytest.skip("no C++ compiler")
    rng = np.random.default_rng(rows)
    x = Tensor(rng.standard_normal((rows, in_features)).astype(np.float32))
    w = Tensor(rng.standard_normal((out_features, in_features)).astype(np.float32))
    weight = Tensor(rng.standard_normal((rows, out_features)).astype(np.float32))
    matmul = ops.MatMul(transpose_b=True)

    def fused(x, w):
        return (op(x, w) * weight).sum()

    def reference(x, w):
        return (matmul(x, w) * weight).sum()

    np.testing.assert_allclose(op(x, w).asnumpy(), matmul(x, w).asnumpy(), rtol=1e-5, atol=1e-4)
    fused_grads = ops.grad(fused, grad_position=(0, 1))(x, w)
    reference_grads = ops.grad(reference, grad_position=(0, 1))(x, w)
    for got, want in zip(fused_grads, reference_grads):
        np.testing.assert_allclose(got.asnumpy(), want.asnumpy(), rtol=1e-5, atol=1e-4)


def test_beam_top_k_picks_the_candidates_the_host_picks():
    """The decode graph's candidates equal the host's `beam_candidates`: the same totals
    (log-softmax in float32 with a float64 log-sum-exp, plus the beam's score) and tokens, ties
    to the lower token, a beam at -1e9 included."""
    from mindsft.generate import beam_candidates, log_softmax
    op = cpu_kernels.beam_top_k(8)
    if op is None:
        pytest.skip("no C++ compiler")
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((4, 1000)) * 3).astype(np.float32)
    logits[1, [5, 17, 400, 999]] = 9.0  # a four-way tie at the top
    logits[2, :] = 0.5                  # a row of nothing but ties
    scores = np.array([0.0, -1.25, -1e9, -3.5], np.float32)

    @ms.jit
    def graph(logits, scores):
        return op(logits, scores)

    totals, tokens = graph(Tensor(logits), Tensor(scores))
    want_totals, want_tokens = beam_candidates(log_softmax(logits), scores, 8)
    assert tokens.asnumpy().tolist() == want_tokens.tolist()
    np.testing.assert_array_equal(totals.asnumpy(), want_totals)
    assert tokens.asnumpy()[1, :4].tolist() == [5, 17, 400, 999]
    assert tokens.asnumpy()[2].tolist() == list(range(8))


def test_decode_attention_equals_the_step_written_out_in_numpy():
    """One decode step: every row takes the cache of the row it continues, rotates its new query
    and key, writes key and value at the slot, and attends over the cache where the mask allows
    (grouped key/value heads; a masked slot holding garbage is never read)."""
    op = cpu_kernels.decode_attention()
    if op is None:
        pytest.skip("no C++ compiler")
    rows, heads, kv_heads, slots, dim, slot = 3, 6, 2, 9, 8, 5
    rng = np.random.default_rng(3)
    q = rng.standard_normal((rows, heads * dim)).astype(np.float32)
    k = rng.standard_normal((rows, kv_heads * dim)).astype(np.float32)
    v = rng.standard_normal((rows, kv_heads * dim)).astype(np.float32)
    angles = rng.uniform(0, 6, (rows, dim // 2)).astype(np.float32)
    cos, sin = np.cos(np.tile(angles, 2)), np.sin(np.tile(angles, 2))
    allowed = np.arange(slots)[None, :] <= slot
    allowed = allowed & (rng.random((rows, slots)) > 0.3) | (np.arange(slots) == slot)
    mask = np.where(allowed, 0, -1e30).astype(np.float32)
    source = np.array([2, 0, 2], np.int32)
    keys = rng.standard_normal((rows, kv_heads, slots, dim)).astype(np.float32)
    values = rng.standard_normal((rows, kv_heads, slots, dim)).astype(np.float32)

    def rotate(x):  # [..., dim], HuggingFace's half-split layout
        return x * cos[:, None] + np.concatenate([-x[..., dim // 2:], x[..., :dim // 2]], -1) * sin[:, None]

    want_keys, want_values = keys[source].copy(), values[source].copy()
    want_keys[:, :, slot] = rotate(k.reshape(rows, kv_heads, dim))
    want_values[:, :, slot] = v.reshape(rows, kv_heads, dim)
    query = rotate(q.reshape(rows, heads, dim)) / np.sqrt(dim)
    grouped = np.repeat(np.arange(kv_heads), heads // kv_heads)
    scores = np.einsum("rhd,rhtd->rht", query, want_keys[:, grouped]) + mask[:, None]
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want_out = np.einsum("rht,rhtd->rhd", probs, want_values[:, grouped]).reshape(rows, heads * dim)

    @ms.jit
    def graph(*inputs):
        return op(*inputs)

    out, new_keys, new_values = graph(*map(Tensor, (q, k, v, cos, sin, mask, np.array([slot], np.int32), source,
                                                    keys, values)))
    np.testing.assert_allclose(new_keys.asnumpy(), want_keys, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(new_values.asnumpy(), want_values)
    np.testing.assert_allclose(out.asnumpy(), want_out, rtol=1e-5, atol=1e-6)


def test_rms_norm_rows_equals_the_norm_cell():
    from mindsft.models.llama import RMSNorm
    norm = RMSNorm(96, 1e-6, LlamaConfig(hidden_size=96, num_layers=1, num_heads=4, vocab_size=64))
    if norm.fused_rows is None:
        pytest.skip("no C++ compiler")
    rng = np.random.default_rng(4)
    norm.weight.set_data(Tensor(rng.standard_normal(96).astype(np.float32)))
    x = Tensor((rng.standard_normal((5, 1, 96)) * 3).astype(np.float32))
    np.testing.assert_allclose(norm.decode_rows(x).asnumpy(), norm(x).asnumpy(), rtol=1e-6, atol=1e-6)
