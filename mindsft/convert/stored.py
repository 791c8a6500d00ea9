"""A tensor that sits in a file and is read block by block, so that no converter ever holds a
whole model, nor even a whole tensor, in memory."""
import dataclasses
import math
from typing import Callable, Iterator, Tuple

import numpy as np

from mindsft.convert import dtypes
from mindsft.errors import ConvertError

# 16 MiB blocks: per-block overhead is already noise at this size (measured by bench/convert.py),
# and a cast holds a few blocks' worth of temporaries at once.
BLOCK_BYTES = 16 * 1024 * 1024


@dataclasses.dataclass
class StoredTensor:
    name: str
    dtype: str  # canonical name, see dtypes.py
    shape: Tuple[int, ...]
    file: str
    # read_blocks(max_elements) yields 1-D storage arrays that together hold the tensor.
    read_blocks: Callable[[int], Iterator[np.ndarray]]

    @property
    def numel(self):
        return math.prod(self.shape)

    @property
    def nbytes(self):
        return self.numel * dtypes.itemsize(self.dtype)

    def blocks(self, dtype=None, block_bytes=BLOCK_BYTES):
        """Yield the tensor's elements as 1-D storage arrays of `dtype` (default: its own)."""
        dtype = dtype or self.dtype
        max_elements = max(1, block_bytes // max(dtypes.itemsize(self.dtype), dtypes.itemsize(dtype)))
        for block in self.read_blocks(max_elements):
            yield dtypes.convert(block, self.dtype, dtype)

    def to_numpy(self):
        """The whole tensor in its storage dtype (bfloat16 as uint16); for tests and small tensors."""
        parts = list(self.read_blocks(max(1, self.numel)))
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, dtypes.storage(self.dtype))
        return flat.reshape(self.shape)


def segment_reader(path, segments, dtype, where):
    """read_blocks for a tensor stored as raw bytes at [(offset, nbytes), ...] of `path`."""
    storage = dtypes.storage(dtype)

    def read_blocks(max_elements):
        with open(path, "rb") as f:
            for offset, nbytes in segments:
                if nbytes % storage.itemsize:
                    raise ConvertError(f"{path}: {where} holds {nbytes} bytes, not a whole number of {dtype}")
                remaining = nbytes // storage.itemsize
                f.seek(offset)
                while remaining:
                    count = min(remaining, max_elements)
                    block = np.empty(count, storage)
                    got = f.readinto(memoryview(block).cast("B"))
                    if got != block.nbytes:
                        raise ConvertError(f"{path} is truncated: {where} ends past the end of the file")
                    yield block
                    del block  # before the next np.empty, so two blocks are never held
                    remaining -= count
    return read_blocks


def row_slice(tensor, name, start_row, shape):
    """The rows [start_row, start_row + shape[0]) of a stored [out, ...] tensor, as a StoredTensor
    that streams (a split entry of a family's weight map: Baichuan's W_pack into q, k, v)."""
    row_elements = math.prod(tensor.shape[1:])
    first, count = start_row * row_elements, math.prod(shape)

    def read_blocks(max_elements):
        position = 0
        for block in tensor.read_blocks(max_elements):
            begin, end = max(first - position, 0), min(first + count - position, block.size)
            position += block.size
            if begin < end:
                yield block[begin:end]
            if position >= first + count:
                return
    return StoredTensor(name, tensor.dtype, tuple(shape), tensor.file, read_blocks)


def stacked(name, parts):
    """One stored tensor whose rows are `parts` one after another (a fused entry on the way out)."""
    shape = (sum(p.shape[0] for p in parts),) + tuple(parts[0].shape[1:])

    def read_blocks(max_elements):
        for part in parts:
            yield from part.read_blocks(max_elements)
    return StoredTensor(name, parts[0].dtype, shape, parts[0].file, read_blocks)


def split_stored(entries, stored):
    """{our name: StoredTensor}, in model order, for the family weight entries whose HF tensor is in
    `stored` {HF name: StoredTensor}: renames pass through, split entries become row slices."""
    tensors = {}
    for entry in entries:
        if entry.hf_name not in stored:
            continue
        tensor, start = stored[entry.hf_name], 0
        for name, shape in zip(entry.ms_names, entry.ms_shapes):
            tensors[name] = row_slice(tensor, name, start, shape) if entry.is_split else tensor
            start += shape[0]
    return tensors
