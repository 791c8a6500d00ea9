"""The MindRecord schema that llama_preprocess writes and the trainer reads: one place for both.

Records are `seq_length + 1` tokens: the model reads the whole record and shifts labels inside,
so position t learns labels[t + 1] (MindFormers' convention: input_ids[:-1] predicts labels[1:]).
"""
import os
import re

import numpy as np

from mindsft.errors import DataError

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

DATASET_TYPES = ("qa", "wiki")
COLUMNS = {"qa": ("input_ids", "labels"), "wiki": ("input_ids",)}
# MindFormers' reader only takes files named like x.mindrecord, x.mindrecord0, x.mindrecord12.
MINDRECORD_NAME = re.compile(r".*mindrecord\d*$")


def columns(dataset_type, packed=False):
    """The columns of a dataset type's records, the boundary column last when packed."""
    if dataset_type not in COLUMNS:
        raise DataError(f"dataset_type {dataset_type!r} is not one of {', '.join(DATASET_TYPES)}")
    return COLUMNS[dataset_type] + ((PACKED_COLUMN,) if packed else ())


def mindrecord_schema(dataset_type, packed=False):
    """FileWriter schema for a dataset type: int32 columns of variable length."""
    return {name: {"type": "int32", "shape": [-1]} for name in columns(dataset_type, packed)}


def record_length(seq_length):
    return seq_length + 1


def mindrecord_files(dataset_dir):
    """The MindRecord data files in a directory (or the one file given), sorted, `.db` excluded."""
    path = os.fspath(dataset_dir)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"{path}: dataset path does not exist")
    files = sorted(os.path.join(path, name) for name in os.listdir(path) if MINDRECORD_NAME.match(name))
    if not files:
        raise DataError(f"{path}: no MindRecord files (names ending in 'mindrecord' or 'mindrecordN')")
    return files


def dataset_manifest(dataset_path):
    """The stats JSON llama_preprocess wrote beside a dataset (`<output_file>.stats.json`), or None.

    It records the template the records were rendered with, so a run trained on them asks its
    questions in the same template.
    """
    import json

    path = os.fspath(dataset_path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if not os.path.isdir(folder):
        return None
    manifests = sorted(name for name in os.listdir(folder) if name.endswith(".stats.json"))
    if not manifests:
        return None
    with open(os.path.join(folder, manifests[0]), encoding="utf-8") as f:
        return json.load(f)


def recorded_template(dataset_path):
    """(template name, where it was found) that llama_preprocess recorded for a dataset, or (None, None)."""
    if not dataset_path:
        return None, None
    template = (dataset_manifest(dataset_path) or {}).get("template")
    return (template, os.fspath(dataset_path)) if template else (None, None)
