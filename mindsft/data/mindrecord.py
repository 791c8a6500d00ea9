"""Writing and reading MindRecord shards in the schema of `mindsft.data.schema`.

Shards are written into a hidden temporary folder beside the output and moved into place only
when complete (index `.db` files first, shard 0 last, since readers open shard 0), so a failed run
never leaves a shard that looks finished.
"""
import os
import re
import shutil
import tempfile

import numpy as np

from mindsft.data.schema import columns as record_columns, mindrecord_schema
from mindsft.errors import DataError

WRITE_BATCH = 512  # records per write call: one call per record is MindRecord's slow path


class EmptyOutputError(DataError):
    """No record reached the writer, so no shard was written."""


class RowBlock:
    """Records of equal length given together, {column: int32 array [records, length]}: the writer
    turns a block into row blobs in a few numpy calls instead of a few per record."""

    def __init__(self, columns):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def blobs(self, fields):
        """Each row's blob (`_blob`'s layout), from one array holding the whole block."""
        parts = []
        for field in fields:
            data = np.ascontiguousarray(self.columns[field], dtype=np.int32).view(np.uint8)
            if len(fields) > 1:
                size = np.frombuffer(data.shape[1].to_bytes(8, "big"), np.uint8)
                parts.append(np.broadcast_to(size, (len(data), 8)))
            parts.append(data)
        rows = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        return [row.tobytes() for row in rows]


def shard_names(output_file, partitions):
    """The data files FileWriter makes: `<output_file>` alone, or `<output_file>0..N-1`."""
    output_file = os.fspath(output_file)
    return [output_file] if partitions == 1 else [f"{output_file}{i}" for i in range(partitions)]


def _existing_outputs(output_file):
    folder, base = os.path.split(os.path.abspath(output_file))
    pattern = re.compile(re.escape(base) + r"\d*(\.db)?$")
    return [os.path.join(folder, n) for n in os.listdir(folder) if pattern.match(n)] if os.path.isdir(folder) else []


def write_mindrecord(records_iter, output_file, dataset_type, partitions=1, packed=False):
    """Write records ({column: int sequence}, or `RowBlock`s of them) to MindRecord shards; returns
    (shard paths, count)."""
    from mindspore.mindrecord import FileWriter
    if partitions < 1:
        raise DataError(f"file_partition must be at least 1, got {partitions}")
    columns = record_columns(dataset_type, packed)
    schema = mindrecord_schema(dataset_type, packed)
    if any(spec != {"type": "int32", "shape": [-1]} for spec in schema.values()):
        raise DataError(f"{dataset_type}: rows are written as int32 arrays only; the schema asks {schema}")
    output_file = os.path.abspath(os.fspath(output_file))
    folder, base = os.path.split(output_file)
    created_folder = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{base}.", suffix=".partial", dir=folder)
    count = 0
    try:
        writer = FileWriter(os.path.join(tmp_dir, base), shard_num=partitions, overwrite=True)
        writer.add_schema(schema, dataset_type)
        write_blobs = _blob_writer(writer)
        blob_fields = list(writer._header.blob_fields)
        batch = []
        for record in records_iter:
            block = record.columns if isinstance(record, RowBlock) else record
            missing = [c for c in columns if c not in block]
            if missing:
                raise DataError(f"record {count} has no column {missing[0]!r} (needed for {dataset_type})")
            if isinstance(record, RowBlock):
                batch.extend(record.blobs(blob_fields))
                count += len(record)
            else:
                batch.append(_blob(record, blob_fields))
                count += 1
            # Calls of WRITE_BATCH rows exactly, whatever the blocks: the same calls, the same file.
            while len(batch) >= WRITE_BATCH:
                write_blobs(batch[:WRITE_BATCH])
                batch = batch[WRITE_BATCH:]
        if batch:
            write_blobs(batch)
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


def _blob_writer(writer):
    """A function writing a list of row blobs through FileWriter's C++ shard writer.

    Every column of the schema is an int32 array, so a row is all blob. FileWriter's Python path
    re-validates each row against the schema and merges its blob with bytes concatenation: that
    took about half the writing time, in the one process that also gathers the workers' results.
    The rows here are built to the schema by `_blob`, so they go to the C++ writer as they are.
    """
    writer._writer.open(writer._paths, writer._overwrite)
    writer._writer.set_shard_header(writer._header)
    from mindspore._c_mindrecord import MSRStatus
    shard_writer = writer._writer._writer

    def write(blobs):
        if shard_writer.write_raw_data({}, blobs, False, False) != MSRStatus.SUCCESS:
            raise DataError(f"{writer._paths[0]}: MindRecord write failed")
    return write


def _blob(record, fields):
    """A row as MindRecord stores its blob: per field, its byte count (8 bytes, big-endian), then
    its bytes (FileWriter's layout; a single field is stored bare)."""
    if len(fields) == 1:
        return np.ascontiguousarray(record[fields[0]], dtype=np.int32).tobytes()
    parts = []
    for field in fields:
        data = np.ascontiguousarray(record[field], dtype=np.int32).tobytes()
        parts += [len(data).to_bytes(8, "big"), data]
    return b"".join(parts)


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
