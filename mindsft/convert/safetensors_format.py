"""Reading and writing safetensors files tensor by tensor, bit-exact for every dtype.

The format: 8 bytes little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}} (offsets relative to the end of the header), then the raw bytes.
"""
import json
import math
import os
import struct

from mindsft.convert import dtypes
from mindsft.convert.stored import StoredTensor, segment_reader
from mindsft.errors import ConvertError

# The safetensors library refuses headers above 100 MB; a larger value means a corrupt file.
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors(path):
    """{name: StoredTensor} of a safetensors file (reads only its header), and its metadata."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConvertError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise ConvertError(f"{path} is truncated or not a safetensors file "
                               f"(header of {header_len} bytes in a file of {size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise ConvertError(f"{path} is corrupt: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path} is corrupt: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        try:
            dtype = dtypes.from_safetensors(info["dtype"], f"{path}: tensor {name}")
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{path} is corrupt: header entry for tensor {name} is malformed") from None
        expected = math.prod(shape) * dtypes.itemsize(dtype)
        if end - begin != expected:
            raise ConvertError(f"{path} is corrupt: tensor {name} {list(shape)} {dtype} needs {expected} bytes, "
                               f"its offsets span {end - begin}")
        if data_start + end > size:
            raise ConvertError(f"{path} is truncated: tensor {name} ends at byte {data_start + end}, "
                               f"the file holds {size} bytes")
        tensors[name] = StoredTensor(name, dtype, shape, path,
                                     segment_reader(path, [(data_start + begin, end - begin)], dtype,
                                                    f"tensor {name}"))
    return tensors, metadata


def write_safetensors(path, tensors, metadata=None, on_bytes=None):
    """Write [(name, dtype, shape, blocks)] to `path`, streaming each tensor's blocks in order.

    `blocks` is an iterable of 1-D storage arrays of `dtype`; `on_bytes(n)` is called as bytes
    are written (for progress bars). The caller makes `path` atomic (see mindsft.output_files).
    """
    header = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape, _ in tensors:
        nbytes = math.prod(shape) * dtypes.itemsize(dtype)
        header[name] = {"dtype": dtypes.safetensors_code(dtype), "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, dtype, shape, blocks in tensors:
            written = 0
            for block in blocks:
                f.write(memoryview(block).cast("B"))
                written += block.nbytes
                if on_bytes:
                    on_bytes(block.nbytes)
            if written != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                raise ConvertError(f"{path}: tensor {name} produced {written} bytes, "
                                   f"expected {math.prod(shape) * dtypes.itemsize(dtype)}")
    return path


# Training checkpoints in safetensors (MindFormers 1.5+'s format) carry a CRC-32 per tensor in the
# header's metadata, as our .ckpt files carry MindSpore's crc trailer: verified before use.
CRC_METADATA_KEY = "mindsft_crc32"


def write_checked_safetensors(path, arrays):
    """Write [(name, dtype, storage array)] with each tensor's CRC-32 in the metadata."""
    import numpy as np
    import zlib
    flat = [(name, dtype, np.asarray(array)) for name, dtype, array in arrays]
    crcs = {name: zlib.crc32(np.ascontiguousarray(array).tobytes()) for name, _, array in flat}
    entries = [(name, dtype, array.shape, [np.ravel(array)]) for name, dtype, array in flat]
    return write_safetensors(path, entries, {"format": "ms", CRC_METADATA_KEY: json.dumps(crcs)})


def verify_safetensors(path):
    """Raise ConvertError naming `path` and the tensor if a recorded CRC-32 does not match (files
    without recorded checksums, such as HuggingFace's, pass unverified)."""
    import zlib
    tensors, metadata = read_safetensors(path)
    if CRC_METADATA_KEY not in metadata:
        return tensors
    try:
        crcs = json.loads(metadata[CRC_METADATA_KEY])
    except ValueError:
        raise ConvertError(f"{path} is damaged: its checksum record is not JSON") from None
    for name, stored in tensors.items():
        crc = 0
        for block in stored.read_blocks(max(1, (16 << 20) // dtypes.itemsize(stored.dtype))):
            crc = zlib.crc32(memoryview(block).cast("B"), crc)
        if crcs.get(name) != crc:
            raise ConvertError(f"{path} is damaged: tensor {name} fails its checksum")
    return tensors
