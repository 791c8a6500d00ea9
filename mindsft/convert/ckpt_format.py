"""Reading and writing MindSpore `.ckpt` files tensor by tensor, without MindSpore.

A `.ckpt` is the protobuf message `Checkpoint { repeated Value value = 1; }` with
`Value { required string tag = 1; oneof { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }`
and `TensorProto { repeated int64 dims = 1; required string tensor_type = 2; required bytes
tensor_content = 3; }` (mindspore/train/checkpoint_pb2.py). A repeated field serialises as
back-to-back records, so the file can be written one Value at a time. MindSpore splits a large
tensor into several Values with the same tag (each holding the full dims) and joins them when
loading; we do the same, which also keeps every protobuf field under its 2 GB limit.

Every file we write ends with MindSpore's own checksum trailer, `b"crc_num"` + the CRC-32 of
all bytes before it (10 bytes, big-endian), exactly what `save_checkpoint(crc_check=True)`
writes and `load_checkpoint(crc_check=True)` verifies. Our reader verifies it before any
tensor is handed out, so a damaged file is named instead of loaded. Files without the trailer
(MindFormers', older ones) are read unverified, as MindSpore reads them.
"""
import dataclasses
import math
import os
import zlib
from typing import List, Tuple

from mindsft.convert import dtypes
from mindsft.convert.stored import StoredTensor, segment_reader
from mindsft.errors import CheckpointError, ConvertError
from mindsft.protowire import I32, I64, LEN, VARINT, len_field_head, varint

# MindSpore's own slice size (serialization.SLICE_SIZE, 512 MiB), so its loader sees what it writes.
CHUNK_BYTES = 512 * 1024 * 1024
_CRC_TRAILER = b"crc_num"
_CRC_TRAILER_BYTES = len(_CRC_TRAILER) + 10
_VERIFY_BLOCK_BYTES = 16 * 1024 * 1024


class CkptWriter:
    """Write a `.ckpt` one tensor at a time: `write(name, dtype, shape, blocks)`; `close()` adds
    the checksum trailer (a writer left by an exception gets none, and its file is unfinished).

    The caller makes the path atomic (see mindsft.output_files.atomic_output).
    """

    def __init__(self, path, chunk_bytes=CHUNK_BYTES):
        self.path = os.fspath(path)
        self.chunk_bytes = chunk_bytes
        self._file = open(self.path, "wb")
        self._crc = 0

    def _put(self, data):
        self._crc = zlib.crc32(data, self._crc)
        self._file.write(data)

    def write(self, name, dtype, shape, blocks, on_bytes=None):
        """Write one tensor; `blocks` yields 1-D storage arrays of `dtype` holding its elements."""
        item = dtypes.itemsize(dtype)
        total = math.prod(shape) * item
        chunk = max(item, self.chunk_bytes - self.chunk_bytes % item)
        tag = name.encode("utf-8")
        dims = b"".join(varint(1 << 3 | VARINT) + varint(int(d)) for d in shape)
        type_code = dtypes.ckpt_code(dtype).encode("ascii")
        pending = _BlockQueue(iter(blocks))
        start = 0
        while True:
            length = min(chunk, total - start)
            tensor_head = dims + len_field_head(2, len(type_code)) + type_code + len_field_head(3, length)
            tensor_len = len(tensor_head) + length
            value_head = len_field_head(1, len(tag)) + tag + len_field_head(2, tensor_len)
            self._put(len_field_head(1, len(value_head) + tensor_len) + value_head + tensor_head)
            for piece in pending.take(length):
                self._put(piece)
                if on_bytes:
                    on_bytes(len(piece))
            start += length
            if start >= total:
                break
        if pending.has_more():
            raise ConvertError(f"{self.path}: tensor {name} produced more than {total} bytes")

    def close(self):
        if not self._file.closed:
            self._file.write(_CRC_TRAILER + self._crc.to_bytes(10, "big"))
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def write_arrays(path, arrays):
    """Write [(name, dtype, storage array)] as a `.ckpt` at `path` (the caller makes it atomic)."""
    import numpy as np
    with CkptWriter(path) as writer:
        for name, dtype, array in arrays:
            array = np.asarray(array)  # not ascontiguousarray: it makes a 0-d array 1-d
            writer.write(name, dtype, array.shape, [np.ravel(array)])


class _BlockQueue:
    """Bytes from an iterator of arrays, handed out in runs of exact lengths."""

    def __init__(self, arrays):
        self._arrays = arrays
        self._left = memoryview(b"")

    def take(self, length):
        while length:
            if not len(self._left):
                block = next(self._arrays, None)
                if block is None:
                    raise ConvertError("a tensor produced fewer bytes than its shape needs")
                self._left = memoryview(block).cast("B")
            piece = self._left[:length]
            self._left = self._left[length:]
            length -= len(piece)
            if not len(self._left):
                self._left = memoryview(b"")  # an empty slice would still pin the whole block
            yield piece
            del piece

    def has_more(self):
        if len(self._left):
            return True
        block = next(self._arrays, None)
        return block is not None and block.nbytes > 0


@dataclasses.dataclass
class CkptEntry:
    """One tag of a `.ckpt` as found on disk: its chunks are [(offset, nbytes)]."""
    name: str
    tensor_type: str  # MindSpore's spelling: Float32, BFloat16, str, ... ('maptensor' for map tensors)
    shape: Tuple[int, ...]
    chunks: List[Tuple[int, int]]


class _Reader:
    def __init__(self, f, path, size):
        self.f, self.path, self.size = f, path, size

    def varint(self, end):
        result, shift = 0, 0
        while True:
            if self.f.tell() >= end:
                raise CheckpointError(f"{self.path} is truncated or corrupt near byte {self.f.tell()}")
            byte = self.f.read(1)[0]
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise CheckpointError(f"{self.path} is corrupt near byte {self.f.tell()} (not a MindSpore checkpoint?)")

    def skip(self, wire, end):
        if wire == VARINT:
            self.varint(end)
        elif wire in (I64, I32):
            self.f.seek(8 if wire == I64 else 4, 1)
        elif wire == LEN:
            self.f.seek(self.varint(end), 1)
        else:
            raise CheckpointError(f"{self.path} is corrupt near byte {self.f.tell()} (not a MindSpore checkpoint?)")
        if self.f.tell() > end:
            raise CheckpointError(f"{self.path} is truncated or corrupt near byte {self.f.tell()}")


def _parse_tensor(reader, end):
    dims, tensor_type, content = [], None, None
    while reader.f.tell() < end:
        key = reader.varint(end)
        number, wire = key >> 3, key & 7
        if number == 1 and wire == VARINT:
            dims.append(reader.varint(end))
        elif number == 1 and wire == LEN:  # packed dims
            stop = reader.f.tell() + reader.varint(end)
            while reader.f.tell() < stop:
                dims.append(reader.varint(stop))
        elif number == 2 and wire == LEN:
            length = reader.varint(end)
            tensor_type = reader.f.read(length).decode("utf-8", "replace")
        elif number == 3 and wire == LEN:
            length = reader.varint(end)
            content = (reader.f.tell(), length)
            reader.f.seek(length, 1)
        else:
            reader.skip(wire, end)
    return dims, tensor_type, content


def stored_checksum(path):
    """The CRC-32 the file's trailer records, or None when it has no trailer."""
    size = os.path.getsize(path)
    if size < _CRC_TRAILER_BYTES:
        return None
    with open(path, "rb") as f:
        f.seek(size - _CRC_TRAILER_BYTES)
        trailer = f.read(_CRC_TRAILER_BYTES)
    if trailer[:len(_CRC_TRAILER)] != _CRC_TRAILER:
        return None
    return int.from_bytes(trailer[len(_CRC_TRAILER):], "big")


def verify_ckpt(path):
    """Raise CheckpointError naming `path` if its bytes fail the checksum; True if verified,
    False if the file carries no checksum (nothing to verify against).

    One extra sequential read: zlib's CRC-32 ran at ~1 GB/s on one core here, so a 7B bfloat16
    checkpoint (13.5 GB) costs ~14 s more per load, against a silently wrong model.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: file not found")
    expected = stored_checksum(path)
    if expected is None:
        return False
    left = os.path.getsize(path) - _CRC_TRAILER_BYTES
    crc = 0
    with open(path, "rb") as f:
        while left:
            block = f.read(min(left, _VERIFY_BLOCK_BYTES))
            if not block:
                break
            crc = zlib.crc32(block, crc)
            left -= len(block)
    if crc != expected:
        raise CheckpointError(f"{path} is damaged: its checksum does not match its contents "
                              "(the file changed after it was written)")
    return True


def read_ckpt_entries(path, verify=True):
    """Every tag of a `.ckpt`, in file order, with where its bytes lie; reads no tensor data
    (except to verify the checksum first, unless `verify` is False)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ConvertError(f"{path}: is a folder, expected a .ckpt file")
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: file not found")
    if verify:
        verify_ckpt(path)
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    entries = []
    with open(path, "rb") as f:
        reader = _Reader(f, path, size)
        if stored_checksum(path) is not None:
            size -= _CRC_TRAILER_BYTES
        while f.tell() < size:
            at = f.tell()
            key = reader.varint(size)
            if key != (1 << 3 | LEN):
                raise CheckpointError(f"{path} is corrupt at byte {at}: not a MindSpore checkpoint "
                                   "(or an encrypted one, which is not supported)")
            value_end = reader.varint(size)
            value_end += f.tell()
            if value_end > size:
                raise CheckpointError(f"{path} is truncated: the record at byte {at} ends at byte {value_end}, "
                                   f"the file holds {size} bytes")
            tag, tensor = None, None
            while f.tell() < value_end:
                field = reader.varint(value_end)
                number, wire = field >> 3, field & 7
                if number == 1 and wire == LEN:
                    tag = f.read(reader.varint(value_end)).decode("utf-8", "replace")
                elif number == 2 and wire == LEN:
                    tensor_end = reader.varint(value_end) + f.tell()
                    tensor = _parse_tensor(reader, tensor_end)
                elif number == 3 and wire == LEN:
                    tensor = ([], "maptensor", None)
                    reader.skip(wire, value_end)
                else:
                    reader.skip(wire, value_end)
            if f.tell() != value_end or tag is None or tensor is None:
                raise CheckpointError(f"{path} is corrupt: the record at byte {at} is malformed")
            dims, tensor_type, content = tensor
            if entries and entries[-1].name == tag and content is not None:
                entries[-1].chunks.append(content)  # the next slice of a split tensor
            else:
                entries.append(CkptEntry(tag, tensor_type, tuple(dims), [content] if content else []))
    return entries


def stored_tensor(path, entry):
    """A StoredTensor reading `entry`'s bytes from `path` (floats and integers only)."""
    where = f"tensor {entry.name}"
    dtype = dtypes.from_ckpt(entry.tensor_type, f"{path}: {where}")
    # MindSpore writes a 0-d tensor with dims [0].
    shape = () if entry.shape == (0,) and sum(n for _, n in entry.chunks) == dtypes.itemsize(dtype) else entry.shape
    held = sum(n for _, n in entry.chunks)
    needed = math.prod(shape) * dtypes.itemsize(dtype)
    if held != needed:
        raise CheckpointError(f"{path} is corrupt: {where} {list(shape)} {dtype} needs {needed} bytes, holds {held}")
    return StoredTensor(entry.name, dtype, shape, path, segment_reader(path, entry.chunks, dtype, where))


def read_ckpt(path, verify=True):
    """{name: StoredTensor} of a `.ckpt`'s tensors, and [(name, tensor_type)] of its other
    entries (strings, map tensors), which converters skip. The checksum is verified first."""
    tensors, others = {}, []
    for entry in read_ckpt_entries(path, verify):
        if dtypes.is_ckpt_code(entry.tensor_type):
            tensors[entry.name] = stored_tensor(path, entry)
        else:
            others.append((entry.name, entry.tensor_type))
    return tensors, others

