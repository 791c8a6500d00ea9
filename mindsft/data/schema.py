"""The MindRecord schema that llama_preprocess writes and the trainer reads: one place for both.

Records are `seq_length + 1` tokens: the model reads the whole record and shifts labels inside,
so position t learns labels[t + 1] (MindFormers' convention: input_ids[:-1] predicts labels[1:]).
"""
import os
import re

import numpy as np

from mindsft.errors import DataError
from mindsft.input_files import read_json

# The label of a token the model does not learn (HuggingFace's and MindFormers' value). The data
# is written with it and the model skips it: it is not a setting, so the two cannot disagree.
IGNORE_INDEX = -100
# Packed qa rows add the samples' cumulative end offsets (see mindsft/data/packing.py); its
# presence in a dataset is what tells the trainer the rows are packed.
PACKED_COLUMN = "actual_seq_len"
# A batch is a dict of these columns (all int32; input_ids and labels [batch, seq_length + 1],
# actual_seq_len [batch, K] when the rows are packed). The model's `loss_terms` takes them in
# this order under the same names; a dataset without `labels` (pretraining text) learns every
# token.
BATCH_COLUMNS = ("input_ids", "labels", PACKED_COLUMN)
BATCH_DTYPES = {name: np.int32 for name in BATCH_COLUMNS}

# MindFormers' Qwen2 layout (research/qwen2/qwen2_preprocess.py): target_ids (= input_ids) and
# attention_mask (0 on padding); the trainer turns them into `labels` as MindFormers trains them:
# position t learns target_ids[t + 1] wherever attention_mask[t] is 1 (see train/batches.py).
TARGET_IDS_COLUMNS = ("input_ids", "target_ids", "attention_mask")

# Preference pairs (`mindsft.data.pairwise`): the chosen and the rejected conversation of one
# prompt, each a full record with its own labels (only its final response and end token learned).
# A batch of pairs is these columns; the preference step stacks chosen over rejected.
PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
PAIR_DTYPES = {name: np.int32 for name in PAIR_COLUMNS}

DATASET_TYPES = ("qa", "wiki", "pairwise")
COLUMNS = {"qa": ("input_ids", "labels"), "wiki": ("input_ids",), "pairwise": PAIR_COLUMNS}
# MindFormers' reader only takes files named like x.mindrecord, x.mindrecord0, x.mindrecord12.
MINDRECORD_NAME = re.compile(r".*mindrecord\d*$")


def columns(dataset_type, packed=False, target_ids=False):
    """The columns of a dataset type's records, the boundary column last when packed; qa records in
    MindFormers' Qwen2 layout with `target_ids`."""
    if dataset_type not in COLUMNS:
        raise DataError(f"dataset_type {dataset_type!r} is not one of {', '.join(DATASET_TYPES)}")
    if target_ids and dataset_type == "qa":
        return TARGET_IDS_COLUMNS
    return COLUMNS[dataset_type] + ((PACKED_COLUMN,) if packed else ())


def mindrecord_schema(dataset_type, packed=False, target_ids=False):
    """FileWriter schema for a dataset type: int32 columns of variable length."""
    return {name: {"type": "int32", "shape": [-1]} for name in columns(dataset_type, packed, target_ids)}


def record_length(seq_length):
    return seq_length + 1


def mindrecord_files(dataset_dir):
    """The MindRecord data files in a directory (or the one file given), sorted, `.db` excluded."""
    path = os.fspath(dataset_dir)
    if os.path.isfile(path):
        check_mindrecord_file(path)
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"{path}: dataset path does not exist")
    files = sorted(os.path.join(path, name) for name in os.listdir(path) if MINDRECORD_NAME.match(name))
    if not files:
        raise DataError(f"{path}: no MindRecord files (names ending in 'mindrecord' or 'mindrecordN')")
    for file in files:
        check_mindrecord_file(file)
    return files


def _read_shard_header(path):
    """The JSON header of a MindRecord data file: 8 bytes of little-endian length, then the JSON."""
    import json
    import struct
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if not 0 < length <= min(size - 8, 64 * 1024 * 1024):
            raise DataError(f"{path}: not a MindRecord file (no shard header); rerun llama_preprocess")
        try:
            header = json.loads(f.read(length).rstrip(b"\0").decode("utf-8"))
        except (ValueError, RecursionError):
            raise DataError(f"{path}: not a MindRecord file (its shard header is unreadable)") from None
    if not isinstance(header, dict) or not isinstance(header.get("shard_addresses"), list):
        raise DataError(f"{path}: not a MindRecord file (its shard header lists no shards)")
    return header


def check_mindrecord_file(path):
    """Check, before MindSpore's C++ reader sees it, that a MindRecord data file has a readable
    header and that it and every shard it names sit in the folder with their `.db` index."""
    folder = os.path.dirname(path)
    header = _read_shard_header(path)
    for shard in [os.path.basename(path)] + [os.path.basename(str(a)) for a in header["shard_addresses"]]:
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise DataError(f"{path}: its shard {shard} is missing from {folder or '.'}")
        index = shard_path + ".db"
        if not os.path.isfile(index):
            raise DataError(f"{shard_path}: its index {os.path.basename(index)} is missing "
                            "(a shard is only readable with its .db beside it)")
        with open(index, "rb") as f:
            if f.read(16) != b"SQLite format 3\0":
                raise DataError(f"{index}: not a MindRecord index (SQLite) file")


def dataset_manifest(dataset_path):
    """The stats JSON llama_preprocess wrote beside a dataset (`<output_file>.stats.json`), or None.

    It records the template the records were rendered with, so a run trained on them asks its
    questions in the same template.
    """
    path = os.fspath(dataset_path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if not os.path.isdir(folder):
        return None
    manifests = sorted(name for name in os.listdir(folder) if name.endswith(".stats.json"))
    if not manifests:
        return None
    return read_json(os.path.join(folder, manifests[0]), DataError, "llama_preprocess stats JSON", expect=dict)


def recorded_template(dataset_path):
    """(template name, where it was found) that llama_preprocess recorded for a dataset, or (None, None)."""
    if not dataset_path:
        return None, None
    template = (dataset_manifest(dataset_path) or {}).get("template")
    return (template, os.fspath(dataset_path)) if template else (None, None)
