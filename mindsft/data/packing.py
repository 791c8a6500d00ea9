"""Sequence packing: whole samples binned into rows, and the boundaries that keep them apart.

A packed row holds several tokenized samples one after another, then padding, and the column
`actual_seq_len` beside `input_ids` and `labels`: the cumulative end offset of each sample in
the row, as MindFormers' `PackingHandler` writes it (`[l1, l1+l2, ...]`, no leading 0).

Where mindsft differs from MindFormers' packer (see ../shared/reference/MINDFORMERS.md):
- rows are `seq_length + 1` tokens with labels aligned to input_ids (the model shifts them), as
  every mindsft record is; MindFormers' packed rows are `seq_length` with labels pre-shifted;
- the padding after the last sample is one more segment, so the last offset is always the row
  length (FlashAttentionScore's TND layout wants the offsets to cover the row);
- the label at a sample's last token would point into the next sample: the model ignores it
  (MindFormers sets it to the pad id 0 and so learns "0" there);
- rows are filled first-fit decreasing over the whole dataset, not greedily in input order;
- a sample longer than a row follows the truncate/drop flags and is counted, never skipped
  silently.
"""
import numpy as np

from mindsft.data.schema import PACKED_COLUMN
from mindsft.errors import DataError


class _FirstFit:
    """Bins of `capacity`; `place(size)` returns the index of the first bin with room, opening
    one if none has. A max-tree over the bins' free space finds it in O(log bins)."""

    def __init__(self, capacity, max_bins):
        self.capacity = capacity
        self.leaves = 1
        while self.leaves < max(1, max_bins):
            self.leaves *= 2
        self.free = np.zeros(2 * self.leaves, dtype=np.int64)
        self.count = 0

    def _set(self, index, free):
        node = index + self.leaves
        self.free[node] = free
        node //= 2
        while node:
            self.free[node] = max(self.free[2 * node], self.free[2 * node + 1])
            node //= 2

    def place(self, size):
        if self.free[1] < size:
            index = self.count
            self.count += 1
            self._set(index, self.capacity - size)
            return index
        node = 1
        while node < self.leaves:
            node = 2 * node if self.free[2 * node] >= size else 2 * node + 1
        index = node - self.leaves
        self._set(index, self.free[node] - size)
        return index


def first_fit_decreasing(lengths, capacity):
    """Bins (lists of sample indices, in input order) holding every sample once, no bin over
    `capacity`. Longest first, ties in input order, so the result depends on the lengths alone."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
        bad = int(np.argmax((lengths < 1) | (lengths > capacity)))
        raise DataError(f"sample {bad} has {lengths[bad]} tokens; a row holds 1 to {capacity}")
    bins = _FirstFit(capacity, len(lengths))
    members = []
    for index in np.argsort(-lengths, kind="stable"):
        slot = bins.place(int(lengths[index]))
        if slot == len(members):
            members.append([])
        members[slot].append(int(index))
    return [sorted(row) for row in members]


def pack_row(samples, row_length, pad_id, ignore_index):
    """One packed row from [(ids, labels)] that fit in `row_length` tokens: padded input_ids and
    labels, and the samples' cumulative end offsets (the padding, if any, ending at row_length)."""
    input_ids = np.full(row_length, pad_id, dtype=np.int32)
    labels = np.full(row_length, ignore_index, dtype=np.int32)
    ends, offset = [], 0
    for ids, sample_labels in samples:
        input_ids[offset:offset + len(ids)] = ids
        labels[offset:offset + len(ids)] = sample_labels
        offset += len(ids)
        ends.append(offset)
    if offset > row_length:
        raise DataError(f"samples of {offset} tokens do not fit a row of {row_length}")
    if offset < row_length:
        ends.append(row_length)
    return {"input_ids": input_ids, "labels": labels, PACKED_COLUMN: np.asarray(ends, dtype=np.int32)}


def pack_samples(samples, row_length, pad_id, ignore_index):
    """Rows (see `pack_row`) holding each of `samples` [(ids, labels)] once, and a summary:
    rows, samples, samples per row (mean/min/max), packing efficiency (sample tokens / row tokens)."""
    bins = first_fit_decreasing([len(ids) for ids, _ in samples], row_length)
    rows = [pack_row([samples[i] for i in members], row_length, pad_id, ignore_index) for members in bins]
    per_row = [len(members) for members in bins]
    tokens = sum(len(ids) for ids, _ in samples)
    summary = {"rows": len(rows), "samples_packed": len(samples),
               "samples_per_row": {"mean": round(len(samples) / max(1, len(rows)), 3),
                                   "min": min(per_row, default=0), "max": max(per_row, default=0)},
               "packing_efficiency": round(tokens / max(1, len(rows) * row_length), 4)}
    return rows, summary


def sample_ids(ends, row_length):
    """[rows, row_length] index of the segment each position belongs to, from [rows, K] offsets
    (numpy; the model computes the same with MindSpore ops)."""
    ends = np.asarray(ends).reshape(len(ends), -1, 1)
    return (ends <= np.arange(row_length).reshape(1, 1, -1)).sum(1)
