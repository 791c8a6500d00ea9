"""Instruction data and WikiText to MindRecord shards, MindFormers' format with exact label masks.

qa: BOS, then each round of the template tokenized on its own, EOS after each reply, right-padded
with the pad id to `seq_length + 1`. Labels are the token ids where the model learns (reply
tokens and the EOS closing each reply) and -100 elsewhere; the boundary comes from the tokenizer's
byte offsets, so no sample is blanked by a count mismatch. Labels are not shifted: the model
shifts them.

wiki: MindFormers' recipe (clean the markup, paragraphs on blank lines, headings dropped,
BOS + tokens + EOS per paragraph, concatenated, cut into `seq_length + 1` chunks).

Tokenization runs in `num_workers` processes over chunks of records taken in order, so the output
does not depend on the number of workers.
"""
import contextlib
import dataclasses
import gc
import glob
import itertools
import json
import multiprocessing
import os
import re
import sys

import numpy as np
from tqdm import tqdm

from mindsft.data.conversations import normalize_record, read_json_records
from mindsft.data.mindrecord import EmptyOutputError, shard_names, write_mindrecord
from mindsft.data.schema import DATASET_TYPES, IGNORE_INDEX, record_length
from mindsft.errors import ConfigError, DataError
from mindsft.files import atomic_output, check_output_path
from mindsft.templates import encode_segment_arrays, get_template
from mindsft.tokenizer import LlamaTokenizer

CHUNK_RECORDS = 256  # records per worker task: 64 measured ~10% slower with 2 workers (pickling, IPC)


@dataclasses.dataclass
class PreprocessOptions:
    """What llama_preprocess.py takes (MindFormers' flags plus mindsft's)."""
    input_glob: str
    model_file: str
    output_file: str
    dataset_type: str = "qa"
    seq_length: int = 2048
    file_partition: int = 1
    repeat: int = 1
    num_workers: int = 1
    template: str = "vicuna_v1.1"
    tokenizer_config: str = None
    on_error: str = "raise"
    drop_overlong: bool = False
    progress: bool = True
    command_line: list = None

    def validate(self):
        if self.dataset_type not in DATASET_TYPES:
            raise ConfigError(f"dataset_type {self.dataset_type!r} is not one of {', '.join(DATASET_TYPES)}")
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        for name in ("seq_length", "file_partition", "repeat", "num_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")


def stats_path(output_file):
    """Where the stats JSON of a run lands: `<output_file>.stats.json`."""
    return os.fspath(output_file) + ".stats.json"


def input_files(input_glob):
    """The files a glob names, sorted; an error if none."""
    files = sorted(glob.glob(os.path.expanduser(input_glob), recursive=True))
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise DataError(f"--input_glob {input_glob!r} matches no file")
    return files


# --- qa ------------------------------------------------------------------------------------------

def encode_conversation(tokenizer, template, messages):
    """(ids, learned flags) arrays of a whole conversation, before truncation and padding."""
    return encode_segment_arrays(tokenizer, template.segments(messages))


def cut_conversation(ids, learned, seq_length, drop_overlong=False):
    """(input_ids, labels, outcome) of one conversation cut to `seq_length + 1` tokens, unpadded.

    outcome is "written", "truncated", "dropped_overlong" or "dropped_no_learned_token" (then the
    arrays are None): a sample is never written with no learned token.
    """
    length = record_length(seq_length)
    outcome = "written"
    if len(ids) > length:
        if drop_overlong:
            return None, None, "dropped_overlong"
        ids, learned, outcome = ids[:length], learned[:length], "truncated"
    ids = np.asarray(ids, dtype=np.int32)
    learned = np.asarray(learned, dtype=bool)
    if not learned.any():
        return None, None, "dropped_no_learned_token"
    return ids, np.where(learned, ids, IGNORE_INDEX).astype(np.int32), outcome


def pad_record(ids, labels, seq_length, pad_id):
    """The MindRecord row: right-padded with `pad_id` (input_ids) and -100 (labels)."""
    length = record_length(seq_length)
    input_ids = np.full(length, pad_id, dtype=np.int32)
    padded_labels = np.full(length, IGNORE_INDEX, dtype=np.int32)
    input_ids[:len(ids)] = ids
    padded_labels[:len(labels)] = labels
    return {"input_ids": input_ids, "labels": padded_labels}


def qa_record(ids, learned, seq_length, pad_id, drop_overlong=False):
    """(padded record or None, outcome) of one tokenized conversation."""
    ids, labels, outcome = cut_conversation(ids, learned, seq_length, drop_overlong)
    return (None if ids is None else pad_record(ids, labels, seq_length, pad_id)), outcome


_WORKER = {}


def _init_worker(model_file, template, tokenizer_config, seq_length, drop_overlong):
    _WORKER.update(tokenizer=LlamaTokenizer(model_file), template=get_template(template, tokenizer_config),
                   seq_length=seq_length, drop_overlong=drop_overlong)


def _qa_task(chunk):
    """Worker: [(file, index, raw record)] -> [(file, index, outcome, payload)] in order."""
    tokenizer, template = _WORKER["tokenizer"], _WORKER["template"]
    out = []
    for path, index, raw in chunk:
        try:
            ids, learned = encode_conversation(tokenizer, template, normalize_record(raw))
        except DataError as err:
            out.append((path, index, "error", str(err)))
            continue
        # Unpadded arrays cross the process boundary: padding here would send ~8x the bytes.
        ids, labels, outcome = cut_conversation(ids, learned, _WORKER["seq_length"], _WORKER["drop_overlong"])
        out.append((path, index, outcome, (ids, labels)))
    return out


def _wiki_task(chunk):
    tokenizer = _WORKER["tokenizer"]
    return [np.asarray(tokenizer.encode(p, add_bos=True, add_eos=True), dtype=np.int32) for p in chunk]


def _chunked(iterable, size):
    iterator = iter(iterable)
    while True:
        chunk = list(itertools.islice(iterator, size))
        if not chunk:
            return
        yield chunk


@contextlib.contextmanager
def _workers(options):
    """A map(task, chunks) that keeps the order: in this process, or in a pool of `num_workers`
    started at once, so they load the tokenizer while this process reads the input."""
    init_args = (options.model_file, options.template, options.tokenizer_config,
                 options.seq_length, options.drop_overlong)
    if options.num_workers == 1:
        _init_worker(*init_args)
        yield map
        return
    # fork would copy MindSpore's threads; spawn workers that import only what they need.
    context = multiprocessing.get_context("spawn")
    with context.Pool(options.num_workers, initializer=_init_worker, initargs=init_args) as pool:
        yield pool.imap


@contextlib.contextmanager
def _gc_paused():
    """Python's cycle collector off for the run: the records make no cycles, and its passes over
    the ever larger heap of records took ~4% of the run."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class RunStats:
    """Counts and the where/why of every record not written as it was read."""

    def __init__(self):
        self.counts = dict(records_read=0, records_written=0, truncated=0, dropped=0, skipped=0,
                           tokens=0, learned_tokens=0)
        self.truncated, self.dropped, self.skipped = [], [], []

    def note(self, kind, path, index, reason):
        self.counts[kind] += 1
        getattr(self, kind).append({"file": path, "record": index, "reason": reason})


def _qa_records(options, stats, pad_id, map_in_order):
    files = input_files(options.input_glob)
    records = []
    for path in files:
        file_records = read_json_records(path)
        if not isinstance(file_records, list):
            raise DataError(f"{path}: expected a JSON array of records or JSON Lines")
        records.extend((path, index, raw) for index, raw in enumerate(file_records))
    stats.counts["records_read"] = len(records)
    if not records:
        raise DataError(f"{', '.join(files)}: no records")
    stats.input_files = files
    work = itertools.chain.from_iterable(itertools.repeat(records, options.repeat))
    bar = tqdm(total=len(records) * options.repeat, unit="rec", desc="tokenizing",
               disable=not options.progress, file=sys.stderr)
    seen = 0
    with bar:
        for results in map_in_order(_qa_task, _chunked(work, CHUNK_RECORDS)):
            for path, index, outcome, payload in results:
                first_pass = seen < len(records)
                seen += 1
                if outcome == "error":
                    if options.on_error == "raise":
                        raise DataError(f"{path}: record {index}: {payload}")
                    if first_pass:
                        stats.note("skipped", path, index, payload)
                    continue
                if outcome.startswith("dropped"):
                    if first_pass:
                        stats.note("dropped", path, index, outcome[len("dropped_"):])
                    continue
                if outcome == "truncated" and first_pass:
                    stats.note("truncated", path, index, f"longer than {record_length(options.seq_length)} tokens")
                ids, labels = payload
                stats.counts["records_written"] += 1
                stats.counts["tokens"] += len(ids)
                stats.counts["learned_tokens"] += int(np.count_nonzero(labels != IGNORE_INDEX))
                yield pad_record(ids, labels, options.seq_length, pad_id)
            bar.update(len(results))


# --- wiki ----------------------------------------------------------------------------------------

_WIKI_REPLACEMENTS = [
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
    (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")]
_WIKI_BRACKETS = [(re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"), (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
                  (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"), (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
                  (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'")]
_WIKI_AFTER = [("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"), (" \n", "\n"),
               ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")]


def clean_wikitext(text):
    """Undo WikiText's tokenization markup, as MindFormers' wiki preprocessing does."""
    text = text.replace("s '", "s'")
    # MindFormers' rule for quoted digits; its pattern matches literal slashes (kept to match it).
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for old, new in _WIKI_REPLACEMENTS:
        text = text.replace(old, new)
    for pattern, replacement in _WIKI_BRACKETS:
        text = pattern.sub(replacement, text)
    for old, new in _WIKI_AFTER:
        text = text.replace(old, new)
    return text


def wiki_paragraphs(text):
    """Paragraphs of cleaned WikiText: split on blank lines, empty ones and headings dropped."""
    return [p for p in clean_wikitext(text).split("\n\n") if p and not p.strip().startswith("=")]


def _wiki_records(options, stats, pad_id, map_in_order):
    files = input_files(options.input_glob)
    stats.input_files = files
    paragraphs = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                paragraphs.extend(wiki_paragraphs(f.read()))
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: cannot read as UTF-8 text ({err})") from None
    stats.counts["records_read"] = len(paragraphs)
    pieces = []
    bar = tqdm(total=len(paragraphs), unit="para", desc="tokenizing", disable=not options.progress, file=sys.stderr)
    with bar:
        for results in map_in_order(_wiki_task, _chunked(paragraphs, CHUNK_RECORDS)):
            pieces.extend(results)
            bar.update(len(results))
    content = np.concatenate(pieces * options.repeat) if pieces else np.zeros(0, np.int32)
    length = record_length(options.seq_length)
    chunk_count = len(content) // length
    stats.counts["remainder_tokens_dropped"] = int(len(content) - chunk_count * length)
    if chunk_count == 0:
        raise DataError(f"{', '.join(files)}: {len(content)} tokens, fewer than one record of {length}")
    for start in range(0, chunk_count * length, length):
        stats.counts["records_written"] += 1
        stats.counts["tokens"] += length
        yield {"input_ids": content[start:start + length]}


# --- the run -------------------------------------------------------------------------------------

def preprocess(options):
    """Tokenize the input files into MindRecord shards plus `<output_file>.stats.json`; returns stats."""
    options.validate()
    for path in shard_names(options.output_file, options.file_partition) + [stats_path(options.output_file)]:
        check_output_path(path)  # before any tokenizing: a folder there is a mistake, not an output
    tokenizer = LlamaTokenizer(options.model_file)
    if options.dataset_type == "qa":
        get_template(options.template, options.tokenizer_config)  # fail on a bad template before any work
    stats = RunStats()
    make_records = _qa_records if options.dataset_type == "qa" else _wiki_records
    with _gc_paused(), _workers(options) as map_in_order:
        records = make_records(options, stats, tokenizer.pad_id, map_in_order)
        try:
            shards, _ = write_mindrecord(records, options.output_file, options.dataset_type, options.file_partition)
        except EmptyOutputError:
            raise DataError(f"{options.input_glob}: no record left to write ({stats.counts['skipped']} skipped, "
                            f"{stats.counts['dropped']} dropped); nothing written") from None
    summary = {
        "dataset_type": options.dataset_type,
        "template": options.template if options.dataset_type == "qa" else None,
        "seq_length": options.seq_length,
        "record_length": record_length(options.seq_length),
        "tokenizer": os.path.abspath(options.model_file),
        "tokenizer_sha256": tokenizer.sha256(),
        "input_files": [os.path.abspath(p) for p in stats.input_files],
        "output_files": shards,
        "file_partition": options.file_partition,
        "repeat": options.repeat,
        **stats.counts,
        "truncated_records": stats.truncated,
        "dropped_records": stats.dropped,
        "skipped_records": stats.skipped,
        "command_line": options.command_line if options.command_line is not None else sys.argv,
    }
    with atomic_output(stats_path(options.output_file)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, ensure_ascii=False)
    return summary
