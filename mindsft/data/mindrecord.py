"""Writing and reading MindRecord shards in the schema of `mindsft.data.schema`.

Shards are written into a hidden temporary folder beside the output and moved into place only
when complete (index `.db` files first, shard 0 last, since readers open shard 0), so a failed run
never leaves a shard that looks finished.
"""
import json
import os
import re
import shutil
import stat
import tempfile

import numpy as np

from mindsft.data.schema import columns as record_columns, mindrecord_schema
from mindsft.errors import DataError

WRITE_BATCH = 512  # records per write call: one call per record is MindRecord's slow path


class EmptyOutputError(DataError):
    """No record reached the writer, so no shard was written."""


class RowBlock:
    """Records of equal length given together: the writer turns a block into row blobs in a few
    numpy calls instead of a few per record.

    `RowBlock(columns)`: {column: int32 array [records, length]}. `RowBlock.padded(...)`: each
    column's records one after another in one flat array, each record `lengths[i]` long, right-padded
    to `row_length` with the column's pad value when written (the padding is never built).
    """

    def __init__(self, columns, lengths=None, row_length=None, pads=None):
        self.columns, self.lengths, self.row_length, self.pads = columns, lengths, row_length, pads

    @classmethod
    def padded(cls, flat_columns, lengths, row_length, pads):
        return cls(flat_columns, np.asarray(lengths, np.int64), row_length, pads)

    def __len__(self):
        return len(self.lengths) if self.lengths is not None else len(next(iter(self.columns.values())))

    def row_size(self):
        """A function: the number of elements of each row of a column."""
        if self.lengths is not None:
            return lambda field: self.row_length
        return lambda field: np.shape(self.columns[field])[1]

    def blobs(self, fields):
        """Each row's blob as MindRecord stores it (`_blob`)."""
        columns = []
        for field in fields:
            if self.lengths is not None:
                columns.append(compressed_pieces(self.columns[field], self.lengths, self.row_length,
                                                 self.pads[field]))
            else:
                data = np.ascontiguousarray(self.columns[field], dtype=np.int32)
                columns.append(compressed_pieces(data.reshape(-1), np.full(len(data), data.shape[1]), data.shape[1]))
        return _joined_fields(columns)


# MindRecord stores each int32 array column compressed (ShardColumn::CompressInt): the element
# count (4 bytes, big-endian), 2 bits per element (4 to a byte, first in the high bits) saying
# whether it takes 1, 2 or 4 bytes, then each element little-endian in that many bytes. Its C++
# loop took ~90% of the writer's time (3.8 of 4.1 s for 21k padded rows of 2049); done here in
# numpy on the tokens alone, the padding's constant bytes appended.

def _width_codes(values):
    """0, 1 or 2 per int32 element: it fits 1, 2 or 4 bytes."""
    return ((values < -128) | (values > 127)).astype(np.uint8) + ((values < -32768) | (values > 32767))


def _bitmap(codes):
    """[rows, 4k] width codes -> [rows, k] bitmap bytes."""
    return (codes[:, 0::4] << 6) | (codes[:, 1::4] << 4) | (codes[:, 2::4] << 2) | codes[:, 3::4]


def compressed_pieces(values, lengths, row_length, pad=0):
    """Per row, (byte count, [buffers]) of MindRecord's compressed column: `values` holds the rows
    one after another, row i `lengths[i]` long, padded with `pad` to `row_length` elements."""
    values = np.ascontiguousarray(values, dtype=np.int32)
    lengths = np.asarray(lengths, np.int64)
    codes = _width_codes(values)
    widths = np.left_shift(np.uint8(1), codes)
    data = memoryview(values.view(np.uint8).reshape(-1, 4)[np.arange(4, dtype=np.uint8) < widths[:, None]])
    byte_ends = np.concatenate(([0], np.cumsum(widths, dtype=np.int64)))[np.cumsum(lengths)]
    byte_starts = np.concatenate(([0], byte_ends[:-1]))
    groups = -(-row_length // 4)
    pad_code = int(_width_codes(np.int32(pad)))
    # Positions past row_length (spare slots of the last bitmap byte) keep code 0, as in the C++.
    pad_codes = np.full((1, groups * 4), pad_code, np.uint8)
    pad_codes[:, row_length:] = 0
    pad_bitmap = memoryview(_bitmap(pad_codes).tobytes())
    # Each row's codes padded to whole bitmap bytes, the rows one after another: its first
    # ceil(length / 4) bitmap bytes; the rest of its bitmap is the padding's.
    token_groups = -(-lengths // 4)
    group_ends = np.cumsum(token_groups)
    row_codes = np.full(int(group_ends[-1]) * 4 if len(lengths) else 0, pad_code, np.uint8)
    row_codes[np.arange(len(values)) + np.repeat((group_ends - token_groups) * 4 - (np.cumsum(lengths) - lengths),
                                                 lengths)] = codes
    for row in np.flatnonzero(token_groups * 4 > row_length):
        row_codes[(group_ends[row] - token_groups[row]) * 4 + row_length:group_ends[row] * 4] = 0
    bitmaps = memoryview(_bitmap(row_codes.reshape(1, -1)).tobytes())
    pad_width = 1 << pad_code
    padding = memoryview(np.int32(pad).tobytes()[:pad_width] * row_length)
    count = int(row_length).to_bytes(4, "big")
    fixed = 4 + groups
    return [(fixed + end - start + (row_length - length) * pad_width,
             (count, bitmaps[group_end - used:group_end], pad_bitmap[used:], data[start:end],
              padding[:(row_length - length) * pad_width]))
            for start, end, length, used, group_end in zip(byte_starts.tolist(), byte_ends.tolist(), lengths.tolist(),
                                                          token_groups.tolist(), group_ends.tolist())]


def _joined_fields(columns):
    """Row blobs from each field's `compressed_pieces`: a single field bare, several each after its
    byte count (8 bytes, big-endian), as ShardColumn::CompressBlob lays them out."""
    if len(columns) == 1:
        return [b"".join(pieces) for _, pieces in columns[0]]
    return [b"".join([part for size, pieces in row for part in (size.to_bytes(8, "big"), *pieces)])
            for row in zip(*columns)]


def shard_names(output_file, partitions):
    """The data files FileWriter makes: `<output_file>` alone, or `<output_file>0..N-1`."""
    output_file = os.fspath(output_file)
    return [output_file] if partitions == 1 else [f"{output_file}{i}" for i in range(partitions)]


def _existing_outputs(output_file):
    folder, base = os.path.split(os.path.abspath(output_file))
    pattern = re.compile(re.escape(base) + r"\d*(\.db)?$")
    return [os.path.join(folder, n) for n in os.listdir(folder) if pattern.match(n)] if os.path.isdir(folder) else []


def write_mindrecord(records_iter, output_file, dataset_type, partitions=1, packed=False, target_ids=False):
    """Write records ({column: int sequence}, or `RowBlock`s of them) to MindRecord shards; returns
    (shard paths, count)."""
    if partitions < 1:
        raise DataError(f"file_partition must be at least 1, got {partitions}")
    columns = record_columns(dataset_type, packed, target_ids)
    schema = mindrecord_schema(dataset_type, packed, target_ids)
    if any(spec != {"type": "int32", "shape": [-1]} for spec in schema.values()):
        raise DataError(f"{dataset_type}: rows are written as int32 arrays only; the schema asks {schema}")
    output_file = os.path.abspath(os.fspath(output_file))
    folder, base = os.path.split(output_file)
    created_folder = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{base}.", suffix=".partial", dir=folder)
    count = 0
    try:
        writer = _CompressedRowWriter(os.path.join(tmp_dir, base), partitions, schema, dataset_type)
        batch = []
        for record in records_iter:
            block = record.columns if isinstance(record, RowBlock) else record
            missing = [c for c in columns if c not in block]
            if missing:
                raise DataError(f"record {count} has no column {missing[0]!r} (needed for {dataset_type})")
            if isinstance(record, RowBlock):
                batch.extend(record.blobs(writer.blob_fields))
                writer.raw_size += len(record) * _raw_row_size(writer.blob_fields, record.row_size())
                count += len(record)
            else:
                batch.append(_blob(record, writer.blob_fields))
                writer.raw_size += _raw_row_size(writer.blob_fields, lambda field: len(record[field]))
                count += 1
            # Calls of WRITE_BATCH rows exactly, whatever the blocks: the same calls, the same file.
            while len(batch) >= WRITE_BATCH:
                writer.write(batch[:WRITE_BATCH])
                batch = batch[WRITE_BATCH:]
        if batch:
            writer.write(batch)
        if count == 0:
            raise EmptyOutputError(f"{output_file}: no records to write; nothing written")
        writer.commit()
        for stale in _existing_outputs(output_file):
            os.unlink(stale)
        finals = shard_names(output_file, partitions)
        for final in finals:
            os.replace(os.path.join(tmp_dir, os.path.basename(final)) + ".db", final + ".db")
        for final in reversed(finals):
            os.replace(os.path.join(tmp_dir, os.path.basename(final)), final)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if created_folder and not os.listdir(folder):
            os.rmdir(folder)  # a failed run leaves nothing behind, not even the folder it made
        raise
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return finals, count


class _CompressedRowWriter:
    """FileWriter's files, from row blobs compressed here (`compressed_pieces`).

    MindRecord's C++ shard writer compresses the blob of a schema with int arrays itself, one
    element at a time. It is given a schema of the same columns as `bytes`, which it stores as
    they come, and the rows already compressed; at commit the shard headers get the int32 schema
    and the byte count compression saved, as FileWriter writes them, before the index is built
    from them. FileWriter's Python path is skipped too: it re-validated each row against the schema
    and merged its blob with bytes concatenation, about half of the write time before this.
    The result is FileWriter's files byte for byte (tests/test_data_preprocess.py checks it).
    """

    def __init__(self, path, partitions, schema, dataset_type):
        from mindspore.mindrecord import FileWriter
        self.writer = FileWriter(path, shard_num=partitions, overwrite=True)
        self.writer.add_schema({name: {"type": "bytes"} for name in schema}, dataset_type)
        self.schema, self.blob_fields = schema, list(self.writer._header.blob_fields)
        self.raw_size = self.stored_size = 0
        self.writer._writer.open(self.writer._paths, self.writer._overwrite)
        self.writer._writer.set_shard_header(self.writer._header)
        self.shard_writer = self.writer._writer._writer

    def write(self, blobs):
        from mindspore._c_mindrecord import MSRStatus
        self.stored_size += sum(map(len, blobs))
        if self.shard_writer.write_raw_data({}, blobs, False, False) != MSRStatus.SUCCESS:
            raise DataError(f"{self.writer._paths[0]}: MindRecord write failed")

    def commit(self):
        from mindspore.mindrecord.core.shardindexgenerator import ShardIndexGenerator
        self.writer._writer.commit()
        for path in self.writer._paths:
            _set_int_schema(path, self.schema, max(0, self.raw_size - self.stored_size))
            # FileWriter leaves its files readable by their owner only.
            os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        from mindspore.mindrecord.config import _get_enc_key, _get_enc_mode, encrypt
        generator = ShardIndexGenerator(os.path.realpath(self.writer._paths[0]), False)
        generator.build()
        generator.write_to_db()
        for path in self.writer._paths:
            os.chmod(path + ".db", stat.S_IRUSR | stat.S_IWUSR)
        # As FileWriter.commit: encrypted when the user set MindRecord's encryption key.
        if _get_enc_key() is not None:
            for path in self.writer._paths:
                encrypt(path, _get_enc_key(), _get_enc_mode())
                encrypt(path + ".db", _get_enc_key(), _get_enc_mode())


def _set_int_schema(path, schema, compression_size):
    """Rewrite a shard's JSON header (8 bytes of little-endian length, then JSON with no spaces,
    its keys in the order read back) with `schema` and `compression_size`."""
    with open(path, "r+b") as f:
        length = int.from_bytes(f.read(8), "little")
        text = f.read(length)
        header = json.loads(text)
        if _header_json(header) != text:
            raise DataError(f"{path}: MindRecord header not laid out as expected (MindSpore version?); "
                            "cannot finish the file")
        # The C++ writer keeps a schema in sorted maps.
        header["schema"][0]["schema"] = {name: dict(sorted(schema[name].items())) for name in sorted(schema)}
        header["compression_size"] = compression_size
        new_text = _header_json(header)
        f.seek(0)
        f.write(len(new_text).to_bytes(8, "little") + new_text + b"\0" * max(0, length - len(new_text)))


def _header_json(header):
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _raw_row_size(fields, length_of):
    """Bytes of a row's blob before compression (what the C++ writer counts compression against)."""
    return sum(4 * length_of(field) + (8 if len(fields) > 1 else 0) for field in fields)


def _blob(record, fields):
    """A row as MindRecord stores its blob: per field, its byte count (8 bytes, big-endian), then
    its compressed bytes (FileWriter's layout; a single field is stored bare)."""
    columns = []
    for field in fields:
        data = np.ascontiguousarray(record[field], dtype=np.int32).reshape(-1)
        columns.append(compressed_pieces(data, [len(data)], len(data)))
    return _joined_fields(columns)[0]


def read_mindrecord(output_file, partitions=None):
    """Every record of a written dataset, in order, as {column: int32 array} (for checks and tests)."""
    import mindspore.dataset as ds
    output_file = os.fspath(output_file)
    files = [output_file] if partitions in (None, 1) and os.path.isfile(output_file) else \
        shard_names(output_file, partitions or _count_shards(output_file))
    dataset = ds.MindDataset(files, shuffle=False)
    return list(dataset.create_dict_iterator(output_numpy=True, num_epochs=1))


def _count_shards(output_file):
    count = 0
    while os.path.isfile(f"{output_file}{count}"):
        count += 1
    if not count:
        raise DataError(f"{output_file}: no MindRecord shards found")
    return count
