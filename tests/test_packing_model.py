"""A packed row computes each of its samples as if it were alone: same per-token losses and the
same gradients as the samples run one by one, in mindsft (fused kernel and masked ops) and in
transformers (positions restarting per sample, block-diagonal mask); the fused kernel with
boundaries equals MindSpore's masked attention."""
import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Tensor, nn, ops

from llama_reference import mindsft_twin, random_hf_llama
from mindsft.models.families import hf_to_ms_arrays, model_config_from_hf
from mindsft.data.packing import pack_row
from mindsft import cpu_kernels

IGNORE = -100
ROW = 41  # seq_length 40 + 1
# Head size 32, so the fused kernel serves it (it takes 32, 64, 128).
MODEL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=64)
# Row 0: a sample ending exactly at the kernel's 16-key block edge, a 1-token sample, two more, padding.
# Row 1: one sample and padding. Row 2: one sample filling the row.
LENGTHS = [[16, 1, 9, 5], [30], [ROW]]


def make_samples(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for lengths in LENGTHS:
        samples = []
        for length in lengths:
            ids = rng.integers(3, MODEL["vocab_size"], length).astype(np.int32)
            ids[0] = 1
            labels = ids.copy()
            labels[:min(length, int(rng.integers(1, 4)))] = IGNORE  # a prompt
            samples.append((ids, labels))
        rows.append(samples)
    return rows


def packed_batch(rows):
    """input_ids, labels [R, ROW] and actual_seq_len [R, K], K the longest, short ones repeating ROW."""
    packed = [pack_row(samples, ROW, 0, IGNORE) for samples in rows]
    count = max(len(p["actual_seq_len"]) for p in packed)
    ends = np.full((len(packed), count), ROW, np.int32)
    for i, p in enumerate(packed):
        ends[i, :len(p["actual_seq_len"])] = p["actual_seq_len"]
    return (np.stack([p["input_ids"] for p in packed]), np.stack([p["labels"] for p in packed]), ends)


def token_losses(logits, labels):
    """Cross-entropy of position t against labels[t + 1], NaN where not learned (numpy, float64)."""
    logits = logits[:-1].astype(np.float64)
    targets = labels[1:]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = logits[np.arange(len(targets)), np.where(targets == IGNORE, 0, targets)]
    return np.where(targets == IGNORE, np.nan, lse - picked)


def hf_alone(hf, samples):
    """transformers, each sample alone: per-token losses and the gradient of their sum, summed."""
    hf.zero_grad()
    losses = []
    for ids, labels in samples:
        logits = hf(torch.from_numpy(ids[None]).long()).logits[0]
        targets = torch.from_numpy(labels[1:]).long()
        per_token = torch.nn.functional.cross_entropy(logits[:-1], targets, ignore_index=IGNORE, reduction="none")
        per_token.sum().backward()
        losses.append(np.where(labels[1:] == IGNORE, np.nan, per_token.detach().numpy()))
    return losses, ms_named_grads(hf)


def ms_named_grads(hf):
    """transformers' parameter gradients under mindsft's parameter names."""
    grads = {n: p.grad.numpy().copy() for n, p in hf.named_parameters()}
    return hf_to_ms_arrays(grads, model_config_from_hf(hf.config.to_dict()))


def split_losses(per_row, ends_rows, rows):
    """Per-token losses of a packed row [R, ROW - 1] cut back into its samples (each len - 1)."""
    out = []
    for r, samples in enumerate(rows):
        start = 0
        for ids, _ in samples:
            out.append(per_row[r][start:start + len(ids) - 1])
            start += len(ids)
    return out


def assert_same_losses(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert np.array_equal(np.isnan(a), np.isnan(b))
        assert np.nanmax(np.abs(a - b), initial=0.0) <= 1e-5


def assert_same_gradients(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        scale = max(np.abs(expected[name]).max(), 1e-30)
        assert np.abs(got[name] - expected[name]).max() / scale <= 1e-4, name


class LossSum(nn.Cell):
    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, labels, actual_seq_len):
        loss_sum, _ = self.model.loss_terms(input_ids, labels, actual_seq_len=actual_seq_len)
        return loss_sum


def assert_packed_losses_equal(model, rows, expected_losses):
    """Run `rows` packed through `model`: each sample's per-token losses equal `expected_losses`
    (its losses alone). Returns the packed batch (input_ids, labels, ends)."""
    from mindsft.data.packing import sample_ids
    input_ids, labels, ends = packed_batch(rows)
    logits = model(Tensor(input_ids), actual_seq_len=Tensor(ends)).asnumpy()
    # The sample-boundary rule: a sample's last token has no target (it would be the next sample's BOS).
    same = sample_ids(ends, ROW)
    shifted = np.where(same[:, 1:] == same[:, :-1], labels[:, 1:], IGNORE)
    per_row = [token_losses(logits[r], np.concatenate([[IGNORE], shifted[r]])) for r in range(len(rows))]
    assert_same_losses(split_losses(per_row, ends, rows), expected_losses)
    return input_ids, labels, ends


@pytest.fixture(scope="module")
def reference():
    hf = random_hf_llama(**MODEL)
    rows = make_samples()
    losses, grads = hf_alone(hf, [s for samples in rows for s in samples])
    return hf, rows, losses, grads


@pytest.mark.parametrize("attention", ["fused_kernel", "masked_ops"])
def test_packed_rows_give_each_samples_losses_and_gradients_alone(reference, attention):
    hf, rows, expected_losses, expected_grads = reference
    model = mindsft_twin(hf)
    if attention == "fused_kernel":
        assert model.model.fused_causal, "g++ is needed to build the fused kernel"
    else:
        model.model.fused_causal = False
    input_ids, labels, ends = assert_packed_losses_equal(model, rows, expected_losses)

    params = model.trainable_params()
    grad_fn = ms.jit(ms.value_and_grad(LossSum(model), None, params))
    loss_sum, grads = grad_fn(Tensor(input_ids), Tensor(labels), Tensor(ends))
    assert abs(float(loss_sum.asnumpy()) - np.nansum(np.concatenate(expected_losses))) <= 1e-4
    assert_same_gradients({p.name: g.asnumpy() for p, g in zip(params, grads)}, expected_grads)


def test_loss_is_the_mean_over_learned_tokens_of_the_packed_batch(reference):
    hf, rows, expected_losses, _ = reference
    model = mindsft_twin(hf)
    input_ids, labels, ends = packed_batch(rows)
    loss = float(model(Tensor(input_ids), Tensor(labels), actual_seq_len=Tensor(ends)).asnumpy())
    learned = np.concatenate(expected_losses)
    assert abs(loss - np.nanmean(learned)) <= 1e-5


def test_transformers_with_restarting_positions_and_block_mask_gives_each_sample_alone(reference):
    """The reference method (LLaMA-Factory's neat_packing) agrees with samples alone too."""
    hf, rows, expected_losses, expected_grads = reference
    input_ids, labels, ends = packed_batch(rows)
    from mindsft.data.packing import sample_ids
    sample = torch.from_numpy(sample_ids(ends, ROW))
    starts = torch.from_numpy(np.array([[0] + list(e[:-1]) for e in ends]))
    positions = torch.arange(ROW)[None] - starts.gather(1, sample)
    causal = torch.tril(torch.ones(ROW, ROW, dtype=torch.bool))
    allowed = causal[None] & (sample[:, :, None] == sample[:, None, :])
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    hf.zero_grad()
    logits = hf(torch.from_numpy(input_ids).long(), attention_mask=mask, position_ids=positions).logits
    shifted = torch.from_numpy(np.where(sample[:, 1:] == sample[:, :-1], labels[:, 1:], IGNORE)).long()
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                                  ignore_index=IGNORE, reduction="none").reshape(shifted.shape)
    per_token.sum().backward()
    per_row = np.where(shifted.numpy() == IGNORE, np.nan, per_token.detach().numpy())
    assert_same_losses(split_losses(per_row, ends, rows), expected_losses)
    assert_same_gradients(ms_named_grads(hf), expected_grads)


class MaskedReference(nn.Cell):
    """Attention within each packed sample with MindSpore's ops: additive block-diagonal causal mask."""

    def __init__(self, rep, mask):
        super().__init__()
        self.rep = rep
        self.mask = Tensor(mask)

    def construct(self, q, k, v, ends, weight):
        k = ops.repeat_interleave(k, self.rep, 1)
        v = ops.repeat_interleave(v, self.rep, 1)
        probs = ops.softmax(ops.matmul(q, k.transpose(0, 1, 3, 2)) + self.mask, -1)
        return (ops.matmul(probs, v) * weight).sum()


class FusedPacked(nn.Cell):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def construct(self, q, k, v, ends, weight):
        out, _ = self.op(q, k, v, ends)
        return (out * weight).sum()


@pytest.mark.parametrize("heads, kv_heads, head_dim, ends", [
    (4, 4, 32, [[16, 17, 26, 31, 37], [37, 37, 37, 37, 37]]),  # a block edge, a 1-token sample; one sample
    (8, 2, 64, [[5, 40, 64, 64], [1, 2, 3, 64]]),              # grouped heads; samples shorter than a block
    (2, 1, 128, [[8, 9, 24, 70], [33, 70, 70, 70]]),            # a row-block edge (8), long samples
])
def test_fused_kernel_with_boundaries_equals_masked_attention(heads, kv_heads, head_dim, ends):
    op = cpu_kernels.packed_attention(head_dim)
    assert op is not None, "g++ is needed to build the fused kernel"
    ends = np.array(ends, np.int32)
    batch, seq = ends.shape[0], int(ends.max())
    from mindsft.data.packing import sample_ids
    sample = sample_ids(ends, seq)
    allowed = np.tril(np.ones((seq, seq), bool))[None] & (sample[:, :, None] == sample[:, None, :])
    mask = np.where(allowed, 0.0, -1e30).astype(np.float32)[:, None]
    rng = np.random.default_rng(seq)
    q = Tensor(rng.standard_normal((batch, heads, seq, head_dim)).astype(np.float32) * 0.3)
    k = Tensor(rng.standard_normal((batch, kv_heads, seq, head_dim)).astype(np.float32))
    v = Tensor(rng.standard_normal((batch, kv_heads, seq, head_dim)).astype(np.float32))
    weight = Tensor(rng.standard_normal((batch, heads, seq, head_dim)).astype(np.float32))
    results = []
    for net in (MaskedReference(heads // kv_heads, mask), FusedPacked(op)):
        value, grads = ms.jit(ms.value_and_grad(net, grad_position=(0, 1, 2)))(q, k, v, Tensor(ends), weight)
        results.append((value.asnumpy(), [g.asnumpy() for g in grads]))
    (ref_value, ref_grads), (value, grads) = results
    assert abs(value - ref_value) <= 1e-5 * max(1.0, abs(ref_value))
    for got, expected in zip(grads, ref_grads):
        assert np.abs(got - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
