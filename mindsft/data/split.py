"""The validation split: records set aside for evaluation before anything is tokenized or packed.

`val_size` is a fraction of the records (0 < val_size < 1) or a count (> 1), as LLaMA-Factory's
`val_size` reads; the eval records are the ones `datasets.Dataset.train_test_split(test_size,
seed)` would put in its test split (the same permutation of the same seed), written in their
original order. Records are told apart by their conversation: a record that occurs several times (drawn
again by an oversampling mix, or a duplicate in the data) counts once, and all its copies go to
the same side, so no sample is in both.
"""
import json
import math
import os

import numpy as np

from mindsft.data.conversations import normalize_record
from mindsft.errors import ConfigError, DataError

SPLITS = ("train", "eval")
EVAL_FOLDER = "eval"


def eval_count(val_size, num_records):
    """How many of `num_records` distinct records go to eval."""
    val_size = float(val_size)
    if val_size > 1:
        if val_size != int(val_size):
            raise ConfigError(f"val_size {val_size}: above 1 it is a count of records, give a whole number")
        count = int(val_size)
    elif 0 < val_size < 1:
        count = math.ceil(val_size * num_records)
    else:
        raise ConfigError(f"val_size {val_size}: give a fraction between 0 and 1 or a count above 1")
    if count >= num_records:
        raise ConfigError(f"val_size {val_size} sets aside {count} of {num_records} records: "
                          "nothing would be left to train on")
    return count


def record_key(record):
    """What makes two records the same sample: the conversation the model sees (ids and other
    fields aside); a malformed record, which preprocessing skips or refuses, by its raw JSON."""
    try:
        content = normalize_record(record)
    except DataError:
        content = record
    return json.dumps(content, sort_keys=True, ensure_ascii=False)


def split_positions(keys, val_size, seed=42):
    """(train positions, eval positions) into a list of record identities `keys`, each ascending;
    `val_size` counts distinct keys, and every copy of a key lands on the side of the key."""
    first_position = {}
    for position, key in enumerate(keys):
        first_position.setdefault(key, position)
    distinct = list(first_position)
    count = eval_count(val_size, len(distinct))
    chosen = np.random.default_rng(seed).permutation(len(distinct))[:count]
    eval_keys = {distinct[i] for i in chosen.tolist()}
    eval_positions = [p for p, key in enumerate(keys) if key in eval_keys]
    train_positions = [p for p, key in enumerate(keys) if key not in eval_keys]
    return train_positions, eval_positions


def default_eval_output(output_file):
    """`out/alpaca.mindrecord` -> `out/eval/alpaca.mindrecord`: a folder of its own, so that the
    training reader, which takes every MindRecord file of its folder, never reads eval records."""
    folder, name = os.path.split(os.fspath(output_file))
    return os.path.join(folder, EVAL_FOLDER, name)


def recorded_eval_dataset_dir(train_dataset_dir):
    """The eval folder llama_preprocess --val_size recorded in the train data's stats JSON, or None."""
    if not train_dataset_dir:
        return None
    path = os.fspath(train_dataset_dir)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if not os.path.isdir(folder):
        return None
    for name in sorted(os.listdir(folder)):
        if name.endswith(".stats.json"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                relative = json.load(f).get("eval_dataset_dir")
            if relative:
                return os.path.normpath(os.path.join(folder, relative))
    return None
