"""Instruction data and WikiText to MindRecord shards, MindFormers' format with exact label masks.

qa: BOS, then each round of the template tokenized on its own, EOS after each reply (a
tokenizer.json encodes the whole conversation as one text, as `apply_chat_template` does),
right-padded with the pad id to `seq_length + 1`. Labels are the token ids where the model learns
(reply tokens and the EOS closing each reply) and -100 elsewhere; the boundary comes from the tokenizer's
byte offsets, so no sample is blanked by a count mismatch. Labels are not shifted: the model
shifts them.

wiki: MindFormers' recipe (clean the markup, paragraphs on blank lines, headings dropped,
BOS + tokens + EOS per paragraph, concatenated, cut into `seq_length + 1` chunks).

Tokenization runs in `num_workers` processes over chunks of records taken in order, so the output
does not depend on the number of workers.

qa data may mix several sources (`mindsft.data.mixing`) and set records aside for evaluation
(`val_size`, `mindsft.data.split`): then two outputs are written, the eval one first.
"""
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import gc
import itertools
import json
import multiprocessing
import os
import re
import sys

import numpy as np
from tqdm import tqdm

from mindsft.data import mixing, split
from mindsft.data.encode import chunk_arrays, chunk_texts, encode_chunk_texts
from mindsft.data.conversations import normalize_record, read_json_records, record_tools
from mindsft.data.mindrecord import EmptyOutputError, RowBlock, shard_names, write_mindrecord
from mindsft.data.mixing import input_files
from mindsft.data.packing import pack_samples
from mindsft.data.pairwise import encode_pair, is_pairwise_record
from mindsft.data.schema import DATASET_TYPES, IGNORE_INDEX, mindrecord_schema, record_length
from mindsft.errors import ConfigError, DataError, MindsftError
from mindsft.output_files import atomic_output, check_output_path
from mindsft.templates import check_template_tokens, encode_segment_arrays, get_template
from mindsft.tokenizer import load_tokenizer, tokenizer_file

CHUNK_RECORDS = 256  # records per worker task: 64 measured ~10% slower with 2 workers (pickling, IPC)


@dataclasses.dataclass
class PreprocessOptions:
    """What llama_preprocess.py takes (MindFormers' flags plus mindsft's)."""
    input_glob: object  # a glob, or a list of globs (one mix source each)
    model_file: str
    output_file: str
    merges_file: str = None   # with a vocab.json as model_file: Qwen2's byte-level BPE pair
    dataset_type: str = "qa"
    seq_length: int = 2048
    file_partition: int = 1
    repeat: int = 1
    num_workers: int = 1
    template: str = "vicuna_v1.1"
    tokenizer_config: str = None
    on_error: str = "raise"
    drop_overlong: bool = False
    packing: bool = False
    # qa: write MindFormers' Qwen2 layout (qwen2_preprocess.py's columns) instead of input_ids/labels.
    target_ids: bool = False
    progress: bool = True
    command_line: list = None
    # Mixing (qa): one weight per input glob, or `sources` read from a manifest.
    mix_weights: list = None
    mix_strategy: str = "concat"
    max_samples: int = None
    sources: list = None
    seed: int = 42
    # The validation split (qa): val_size 0 = none; `split` is the side a pass writes (set by preprocess).
    val_size: float = 0
    eval_output_file: str = None
    split: str = None

    def validate(self):
        if self.dataset_type not in DATASET_TYPES:
            raise ConfigError(f"dataset_type {self.dataset_type!r} is not one of {', '.join(DATASET_TYPES)}")
        if self.target_ids and (self.packing or self.dataset_type != "qa"):
            raise ConfigError("the target_ids layout (MindFormers' Qwen2 columns) is for unpacked qa records")
        if self.packing and self.dataset_type != "qa":
            raise ConfigError("packing applies to qa data (wiki records are already cut from one stream; "
                              "a preference pair's two sides are kept apart)")
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        for name in ("seq_length", "file_partition", "repeat", "num_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.mix_strategy not in mixing.MIX_STRATEGIES:
            raise ConfigError(f"mix_strategy {self.mix_strategy!r} is not one of {', '.join(mixing.MIX_STRATEGIES)}")
        if self.dataset_type == "wiki" and (self.val_size or self.mix_weights or self.sources
                                          or self.mix_strategy != "concat"):
            raise ConfigError("mixing sources and val_size apply to qa data (wiki inputs are concatenated)")


def stats_path(output_file):
    """Where the stats JSON of a run lands: `<output_file>.stats.json`."""
    return os.fspath(output_file) + ".stats.json"


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


def cut_conversations(ids, learned, lengths, seq_length, drop_overlong=False):
    """`cut_conversation` of a chunk's conversations given as flat arrays (ids, learned flags, token
    counts): (input_ids, labels, lengths) of the kept ones, flat and unpadded, and each
    conversation's outcome, with no Python step per token."""
    length = record_length(seq_length)
    overlong = lengths > length
    kept_lengths = np.minimum(lengths, length)
    if drop_overlong:
        kept_lengths[overlong] = 0
    conversation = np.repeat(np.arange(len(lengths)), lengths)
    position = np.arange(len(ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    inside = position < kept_lengths[conversation]
    learned_counts = np.bincount(conversation[inside & learned], minlength=len(lengths))
    # A dropped overlong conversation keeps no token, so it has no learned token either.
    kept = learned_counts > 0
    outcomes = np.where(overlong, "truncated", "written").astype(object)
    outcomes[~kept] = "dropped_overlong" if drop_overlong else "dropped_no_learned_token"
    if drop_overlong:
        outcomes[~kept & ~overlong] = "dropped_no_learned_token"
    inside &= kept[conversation]
    kept_ids = ids[inside].astype(np.int32)
    labels = np.where(learned[inside], kept_ids, IGNORE_INDEX).astype(np.int32)
    return kept_ids, labels, kept_lengths[kept], outcomes.tolist()


def pad_rows(ids, labels, lengths, seq_length, pad_id):
    """`pad_record` of many records given as flat arrays, as a `RowBlock` the writer pads."""
    return RowBlock.padded({"input_ids": ids, "labels": labels}, lengths, record_length(seq_length),
                           {"input_ids": pad_id, "labels": IGNORE_INDEX})


def target_ids_rows(ids, labels, lengths, seq_length, pad_id):
    """`pad_rows` in MindFormers' Qwen2 layout (research/qwen2/qwen2_preprocess.py): target_ids equal
    to input_ids (every token learned: `labels` are not written) and attention_mask 0 where the token
    is the pad id."""
    ids = np.asarray(ids, np.int32)
    return RowBlock.padded({"input_ids": ids, "target_ids": ids, "attention_mask": (ids != pad_id).astype(np.int32)},
                           lengths, record_length(seq_length), {"input_ids": pad_id, "target_ids": pad_id,
                                                                "attention_mask": 0})


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


def _init_worker(model_file, merges_file, template, tokenizer_config, seq_length, drop_overlong, tokenizer=None):
    _WORKER.clear()
    _WORKER.update(seq_length=seq_length, drop_overlong=drop_overlong)
    # Workers start before the main process has checked the tokenizer and template: a mistake is
    # kept for the first task (the main process reports it first, in one line) rather than raised
    # here, where the pool would print its traceback and start the worker again.
    try:
        _WORKER["tokenizer"] = tokenizer or load_tokenizer(model_file, merges_file)
        _WORKER["template"] = get_template(template, tokenizer_config, _WORKER["tokenizer"])
    except MindsftError as err:
        _WORKER["error"] = err


def _worker_tokenizer(template_too=False):
    if "error" in _WORKER and ("tokenizer" not in _WORKER or template_too):
        raise _WORKER["error"]
    return _WORKER["tokenizer"]


class _StagedTask:
    """A chunk task as three stages, prepare -> encode -> finish, so that a thread can run the
    tokenizer's (which does not hold the GIL) while this one prepares and finishes other chunks;
    called whole in a worker process."""

    def __init__(self, prepare, encode, finish):
        self.prepare, self.encode, self.finish = prepare, encode, finish

    def __call__(self, chunk):
        prepared = self.prepare(chunk)
        return self.finish(prepared, self.encode(prepared))


def _qa_prepare(chunk):
    """[(file, index, raw record)] -> (chunk, outcomes with errors filled in, positions laid out,
    what the tokenizer encodes: segments, or a tokenizer.json's texts and learned spans)."""
    tokenizer, template = _worker_tokenizer(template_too=True), _WORKER["template"]
    outcomes, segments, laid_out = [None] * len(chunk), [], []
    for position, (path, index, raw) in enumerate(chunk):
        try:
            segments.append(template.segments(normalize_record(raw), tools=record_tools(raw)))
        except DataError as err:
            outcomes[position] = (path, index, "error", str(err))
            continue
        laid_out.append(position)
    return chunk, outcomes, laid_out, chunk_texts(tokenizer, segments)


def _qa_encode(prepared):
    # The chunk is encoded in one call: a tokenizer.json encodes a batch ~20% faster than one by one.
    return encode_chunk_texts(_worker_tokenizer(), prepared[-1])


def _qa_finish(prepared, encoded):
    """-> ([(file, index, outcome, error or None)] in order, (input_ids, labels, lengths) of the
    records kept, flat and unpadded)."""
    chunk, outcomes, laid_out, texts = prepared
    # Cut as flat arrays: per-record numpy calls took ~1 s of 21k records. Unpadded arrays cross the
    # process boundary: padding here would send ~8x the bytes.
    ids, learned, lengths = chunk_arrays(_worker_tokenizer(), texts, encoded)
    ids, labels, kept_lengths, cut = cut_conversations(ids, learned, lengths, _WORKER["seq_length"],
                                                       _WORKER["drop_overlong"])
    for position, outcome in zip(laid_out, cut):
        path, index, _ = chunk[position]
        outcomes[position] = (path, index, outcome, None)
    return outcomes, (ids, labels, kept_lengths)


_qa_task = _StagedTask(_qa_prepare, _qa_encode, _qa_finish)


def _wiki_task(chunk):
    tokenizer = _worker_tokenizer()
    return [np.asarray(tokenizer.encode(p, add_bos=True, add_eos=True), dtype=np.int32) for p in chunk]


def _chunked(iterable, size):
    iterator = iter(iterable)
    while True:
        chunk = list(itertools.islice(iterator, size))
        if not chunk:
            return
        yield chunk


def _checked_tokenizer(options):
    """(tokenizer, template or None) of a run; a bad tokenizer or template, or a template the
    tokenizer cannot spell, fails here, before any record is read."""
    tokenizer = load_tokenizer(options.model_file, options.merges_file)
    template = None
    if options.dataset_type in ("qa", "pairwise"):
        template = get_template(options.template, options.tokenizer_config, tokenizer)
        check_template_tokens(template, tokenizer)
    return tokenizer, template


@contextlib.contextmanager
def _workers(options):
    """(tokenizer, template, map(task, chunks) that keeps the order): in this process (a
    tokenizer.json's encoding in a thread beside it), or in a pool of `num_workers` started first,
    so they load the tokenizer while this process loads and checks its own and reads the input.
    The output does not depend on which."""
    init_args = (options.model_file, options.merges_file, options.template, options.tokenizer_config,
                 options.seq_length, options.drop_overlong)
    # A tokenizer.json is encoded here: the `tokenizers` library spreads each chunk over the cores on
    # its own threads, which measured cheaper than worker processes that each start and load it
    # (6993 alpaca records: 5.9 CPU s against 10.4 with 2 processes, the same wall time or less).
    # Pairs are encoded in this process (`_pairwise_records`): no pool to start for them.
    if options.num_workers == 1 or tokenizer_file(options.model_file).endswith(".json") \
            or options.dataset_type == "pairwise":
        tokenizer, template = _checked_tokenizer(options)
        _init_worker(*init_args, tokenizer=tokenizer)
        if not tokenizer.parses_special_text:
            yield tokenizer, template, map
            return
        # The library encodes without holding the GIL: a thread tokenizes the next chunks while this
        # one compresses and writes the last (one process, so no second copy of the tokenizer).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            yield tokenizer, template, functools.partial(_map_ahead, pool)
        return
    # fork would copy MindSpore's threads; spawn workers that import only what they need.
    context = multiprocessing.get_context("spawn")
    with context.Pool(options.num_workers, initializer=_init_worker, initargs=init_args) as pool:
        yield (*_checked_tokenizer(options), pool.imap)


def _map_ahead(pool, task, items, ahead=2):
    """map(task, items) in order: a `_StagedTask`'s encode stage runs in `pool`, `ahead` chunks
    ahead, while this thread prepares the next chunks and finishes (and the caller writes) the last."""
    if not isinstance(task, _StagedTask):
        task = _StagedTask(lambda item: item, task, lambda item, result: result)
    pending = collections.deque()
    try:
        for item in items:
            prepared = task.prepare(item)
            pending.append((prepared, pool.submit(task.encode, prepared)))
            if len(pending) > ahead:
                prepared, future = pending.popleft()
                yield task.finish(prepared, future.result())
        while pending:
            prepared, future = pending.popleft()
            yield task.finish(prepared, future.result())
    finally:
        for _, future in pending:
            future.cancel()


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
        self.sources, self.source_of_file = [], {}

    def note_written(self, path):
        if self.sources:
            self.sources[self.source_of_file[path]]["records_written"] += 1

    def note(self, kind, path, index, reason):
        self.counts[kind] += 1
        getattr(self, kind).append({"file": path, "record": index, "reason": reason})


def _mixed_records(options, stats):
    """[(file, index, raw record)] this pass writes: the sources mixed, then its side of the split."""
    sources = options.sources or mixing.build_sources(options.input_glob, options.mix_weights, options.max_samples)
    mixed = mixing.mix_sources(sources, options.mix_strategy, options.seed)
    records, owners = mixed.records, mixed.source_of_record
    if options.split is not None:
        sides = split.split_positions([split.record_key(raw) for _, _, raw in records], options.val_size,
                                     options.seed)
        chosen = sides[split.SPLITS.index(options.split)]
        records, owners = [records[p] for p in chosen], [owners[p] for p in chosen]
    stats.sources = [dict(summary, records_taken=owners.count(n), records_written=0)
                     for n, summary in enumerate(mixed.sources)]
    stats.source_of_file = {path: owner for (path, _, _), owner in zip(records, owners)}
    stats.input_files = mixed.files
    return records


def _qa_records(options, stats, pad_id, map_in_order):
    records = _mixed_records(options, stats)
    stats.counts["records_read"] = len(records)
    work = itertools.chain.from_iterable(itertools.repeat(records, options.repeat))
    bar = tqdm(total=len(records) * options.repeat, unit="rec", desc="tokenizing",
               disable=not options.progress, file=sys.stderr)
    seen = 0
    samples = []  # when packing: every (ids, labels), binned once all are known
    with bar:
        for outcomes, (ids, labels, lengths) in map_in_order(_qa_task, _chunked(work, CHUNK_RECORDS)):
            for path, index, outcome, error in outcomes:
                first_pass = seen < len(records)
                seen += 1
                if outcome == "error":
                    if options.on_error == "raise":
                        raise DataError(f"{path}: record {index}: {error}")
                    if first_pass:
                        stats.note("skipped", path, index, error)
                    continue
                if outcome.startswith("dropped"):
                    if first_pass:
                        stats.note("dropped", path, index, outcome[len("dropped_"):])
                    continue
                if outcome == "truncated" and first_pass:
                    stats.note("truncated", path, index, f"longer than {record_length(options.seq_length)} tokens")
                stats.counts["records_written"] += 1
                stats.note_written(path)
            stats.counts["tokens"] += len(ids)
            stats.counts["learned_tokens"] += int(np.count_nonzero(labels != IGNORE_INDEX))
            if options.packing:
                bounds = np.cumsum(lengths)[:-1]
                samples.extend(zip(np.split(ids, bounds), np.split(labels, bounds)))
            elif len(lengths):
                yield (target_ids_rows if options.target_ids else pad_rows)(ids, labels, lengths,
                                                                            options.seq_length, pad_id)
            bar.update(len(outcomes))
    if options.packing:
        yield from _packed_rows(samples, options, stats, pad_id)


def _packed_rows(samples, options, stats, pad_id):
    """Every sample placed once in rows of `seq_length + 1`; the stats count rows as records."""
    rows, summary = pack_samples(samples, record_length(options.seq_length), pad_id, IGNORE_INDEX)
    stats.counts.update(summary, records_written=summary["rows"])
    yield from rows


def _pairwise_records(options, stats, tokenizer, template):
    """Rows of the four pair columns (`mindsft.data.pairwise`), mixed and split as qa records.
    Encoded in this process: a pair is two conversations, and pairwise sets are small."""
    records = _mixed_records(options, stats)
    stats.counts["records_read"] = len(records)
    work = itertools.chain.from_iterable(itertools.repeat(records, options.repeat))
    bar = tqdm(total=len(records) * options.repeat, unit="pair", desc="tokenizing",
               disable=not options.progress, file=sys.stderr)
    with bar:
        for seen, (path, index, raw) in enumerate(work):
            first_pass = seen < len(records)
            bar.update(1)
            try:
                row, outcome = encode_pair(tokenizer, template, raw, options.seq_length, tokenizer.pad_id,
                                           options.drop_overlong)
            except DataError as err:
                if options.on_error == "raise":
                    raise DataError(f"{path}: record {index}: {err}") from None
                if first_pass:
                    stats.note("skipped", path, index, str(err))
                continue
            if row is None:
                if first_pass:
                    stats.note("dropped", path, index, outcome[len("dropped_"):])
                continue
            if outcome == "truncated" and first_pass:
                stats.note("truncated", path, index, f"prompt and replies longer than "
                                                     f"{record_length(options.seq_length)} tokens")
            stats.counts["records_written"] += 1
            stats.note_written(path)
            for side in ("chosen", "rejected"):
                stats.counts["tokens"] += int(np.count_nonzero(row[f"{side}_input_ids"] != tokenizer.pad_id))
                stats.counts["learned_tokens"] += int(np.count_nonzero(row[f"{side}_labels"] != IGNORE_INDEX))
            yield row


def detected_dataset_type(options):
    """qa input whose first record is a preference pair (`chosen` and `rejected`) is pairwise."""
    if options.dataset_type != "qa" or options.sources:
        return options.dataset_type
    globs = options.input_glob if isinstance(options.input_glob, list) else [options.input_glob]
    files = input_files(globs[0]) if globs and globs[0] else []
    if not files:
        return options.dataset_type
    records = read_json_records(files[0])
    return "pairwise" if isinstance(records, list) and records and is_pairwise_record(records[0]) \
        else options.dataset_type


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
    """Tokenize the input files into MindRecord shards plus `<output_file>.stats.json`; returns stats
    (with a validation split, the train output's)."""
    options.validate()
    if options.split is None and detected_dataset_type(options) != options.dataset_type:
        # The stats' dataset_type says so (the command line prints it).
        options = dataclasses.replace(options, dataset_type="pairwise")
    if options.val_size and options.split is None:
        eval_file = options.eval_output_file or split.default_eval_output(options.output_file)
        preprocess(dataclasses.replace(options, split="eval", output_file=eval_file, repeat=1))
        return preprocess(dataclasses.replace(options, split="train", eval_output_file=eval_file))
    for path in shard_names(options.output_file, options.file_partition) + [stats_path(options.output_file)]:
        check_output_path(path)  # before any tokenizing: a folder there is a mistake, not an output
    stats = RunStats()
    make_records = _qa_records if options.dataset_type == "qa" else _wiki_records
    with _gc_paused(), _workers(options) as (tokenizer, template, map_in_order):
        if options.dataset_type == "pairwise":
            records = _pairwise_records(options, stats, tokenizer, template)
        else:
            records = make_records(options, stats, tokenizer.pad_id, map_in_order)
        try:
            shards, _ = write_mindrecord(records, options.output_file, options.dataset_type, options.file_partition,
                                         packed=options.packing, target_ids=options.target_ids)
        except EmptyOutputError:
            raise DataError(f"{options.input_glob}: no record left to write ({stats.counts['skipped']} skipped, "
                            f"{stats.counts['dropped']} dropped); nothing written") from None
    summary = {
        "dataset_type": options.dataset_type,
        "template": options.template if options.dataset_type != "wiki" else None,
        "seq_length": options.seq_length,
        "record_length": record_length(options.seq_length),
        "packing": options.packing,
        "columns": list(mindrecord_schema(options.dataset_type, options.packing, options.target_ids)),
        "tokenizer": os.path.abspath(tokenizer.path),
        "tokenizer_sha256": tokenizer.sha256(),
        "tokenizer_config": getattr(template, "path", None) and os.path.abspath(template.path),
        "input_files": [os.path.abspath(p) for p in stats.input_files],
        "output_files": shards,
        "file_partition": options.file_partition,
        "repeat": options.repeat,
        **stats.counts,
        **_mix_and_split_summary(options, stats),
        "truncated_records": stats.truncated,
        "dropped_records": stats.dropped,
        "skipped_records": stats.skipped,
        "command_line": options.command_line if options.command_line is not None else sys.argv,
    }
    with atomic_output(stats_path(options.output_file)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, ensure_ascii=False)
    return summary


def _mix_and_split_summary(options, stats):
    if options.dataset_type == "wiki":
        return {}
    summary = {"mix_strategy": options.mix_strategy, "seed": options.seed, "sources": stats.sources}
    if options.split is not None:
        summary.update(split=options.split, val_size=options.val_size)
    if options.split == "train":
        # Relative, so that training finds the eval records after the folder is moved.
        eval_folder = os.path.dirname(os.path.abspath(options.eval_output_file))
        train_folder = os.path.dirname(os.path.abspath(options.output_file))
        summary["eval_dataset_dir"] = os.path.relpath(eval_folder, train_folder)
    return summary
