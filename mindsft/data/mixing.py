"""Several instruction datasets mixed into one, with LLaMA-Factory's strategies.

A source is a glob (its files read in sorted order) with a weight and an optional `max_samples`
(its first N records, as LLaMA-Factory takes them). Strategies:
- `concat`: every source in turn, each in its own order (weights unused);
- `interleave_under` / `interleave_over`: draw the source of each next record with the given
  probabilities until the first / every source is exhausted (an exhausted source starts over),
  exactly as `datasets.interleave_datasets(..., seed, stopping_strategy="first_exhausted" /
  "all_exhausted")` orders rows; with no weights, round robin as it does.
Sources come from `--input_glob a.json b.jsonl --mix_weights 0.7 0.3` or a YAML/JSON manifest.
"""
import dataclasses
import glob
import os
from typing import List, Optional

import numpy as np

from mindsft.data.conversations import read_json_records
from mindsft.errors import ConfigError, DataError

MIX_STRATEGIES = ("concat", "interleave_under", "interleave_over")
# datasets.interleave_datasets draws sources 1000 at a time; the same blocks give the same order.
DRAW_BLOCK = 1000


@dataclasses.dataclass
class Source:
    """One dataset of a mix: the files of a glob, its weight, the first max_samples records."""
    input_glob: str
    weight: Optional[float] = None
    max_samples: Optional[int] = None


def input_files(input_glob):
    """The files one glob (or each of a list of globs) names, sorted per glob; an error if none."""
    globs = [input_glob] if isinstance(input_glob, (str, os.PathLike)) else list(input_glob)
    files = []
    for pattern in globs:
        matched = sorted(f for f in glob.glob(os.path.expanduser(os.fspath(pattern)), recursive=True)
                         if os.path.isfile(f))
        if not matched:
            raise DataError(f"--input_glob {os.fspath(pattern)!r} matches no file")
        files.extend(matched)
    return files


def read_manifest(path):
    """(sources, mix_strategy or None) from a YAML/JSON manifest: a list of sources, or a mapping
    with `sources` and optionally `mix_strategy`; a source is a glob string or a mapping with
    `path` (or `input_glob`), `weight` and `max_samples`."""
    import yaml  # YAML is a superset of JSON: one reader for both

    try:
        with open(path, encoding="utf-8") as f:
            content = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the mix manifest ({err})") from None
    strategy = None
    if isinstance(content, dict):
        unknown = set(content) - {"sources", "mix_strategy"}
        if unknown:
            raise ConfigError(f"{path}: unknown manifest key(s) {', '.join(sorted(unknown))} "
                              "(known: sources, mix_strategy)")
        strategy, content = content.get("mix_strategy"), content.get("sources")
    if not isinstance(content, list) or not content:
        raise ConfigError(f"{path}: the manifest needs a non-empty list of sources")
    folder = os.path.dirname(os.path.abspath(path))
    sources = []
    for number, entry in enumerate(content):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: source {number} must be a glob or a mapping with 'path'")
        entry = dict(entry)
        pattern = entry.pop("path", None) or entry.pop("input_glob", None)
        if not pattern:
            raise ConfigError(f"{path}: source {number} has no 'path'")
        unknown = set(entry) - {"weight", "max_samples"}
        if unknown:
            raise ConfigError(f"{path}: source {number}: unknown key(s) {', '.join(sorted(unknown))} "
                              "(known: path, weight, max_samples)")
        # Relative globs are relative to the manifest, so a manifest travels with its data.
        pattern = os.path.join(folder, os.path.expanduser(pattern))
        sources.append(Source(pattern, entry.get("weight"), entry.get("max_samples")))
    return sources, strategy


def build_sources(input_globs, mix_weights=None, max_samples=None):
    """Sources from the command line: one per glob, weights in the same order."""
    globs = [input_globs] if isinstance(input_globs, (str, os.PathLike)) else list(input_globs)
    if mix_weights is not None and len(mix_weights) != len(globs):
        raise ConfigError(f"--mix_weights gives {len(mix_weights)} weight(s) for {len(globs)} --input_glob "
                          "source(s); give one weight per source")
    weights = list(mix_weights) if mix_weights is not None else [None] * len(globs)
    return [Source(os.fspath(g), w, max_samples) for g, w in zip(globs, weights)]


def probabilities(sources):
    """The sources' weights scaled to sum to 1, or None when no source has a weight."""
    weights = [s.weight for s in sources]
    if all(w is None for w in weights):
        return None
    if any(w is None for w in weights):
        raise ConfigError("either every source has a weight or none has")
    weights = np.asarray(weights, np.float64)
    if (weights < 0).any() or weights.sum() <= 0:
        raise ConfigError(f"mix weights {weights.tolist()} must be >= 0 with a positive sum")
    return (weights / weights.sum()).tolist()


def mix_order(lengths, strategy="concat", probs=None, seed=42):
    """[(source, index)] in output order, for sources of `lengths` records."""
    if strategy not in MIX_STRATEGIES:
        raise ConfigError(f"mix_strategy {strategy!r} is not one of {', '.join(MIX_STRATEGIES)}")
    if strategy == "concat":
        return [(source, index) for source, length in enumerate(lengths) for index in range(length)]
    oversample = strategy == "interleave_over"
    if probs is None:
        rounds = max(lengths) if oversample else min(lengths)
        return [(source, row % length) for row in range(rounds) for source, length in enumerate(lengths)]
    drawable = [p > 0 for p in probs]
    if oversample and not all(drawable):
        raise ConfigError("interleave_over never exhausts a source of weight 0; remove it or give it a weight")
    rng = np.random.default_rng(seed)
    taken = [0] * len(lengths)
    exhausted = [False] * len(lengths)
    stop = all if oversample else any
    order = []
    while True:
        for source in rng.choice(len(lengths), size=DRAW_BLOCK, p=probs).tolist():
            if stop(e for e, d in zip(exhausted, drawable) if d):
                return order
            order.append((source, taken[source] % lengths[source]))
            taken[source] += 1
            exhausted[source] |= taken[source] >= lengths[source]


@dataclasses.dataclass
class MixedRecords:
    """The records of a mix in output order, as (file, index in file, raw record), and per source
    what was read and taken."""
    records: List[tuple]
    source_of_record: List[int]
    sources: List[dict]
    files: List[str]


def mix_sources(sources, strategy="concat", seed=42):
    """Read every source (its first max_samples records) and mix them; see `mix_order`."""
    per_source, summaries, files, owner = [], [], [], {}
    for number, source in enumerate(sources):
        records = []
        for path in input_files(source.input_glob):
            if path in owner:
                raise ConfigError(f"{path} is in mix sources {owner[path]} and {number}; "
                                  "give each file to one source")
            owner[path] = number
            file_records = read_json_records(path)
            if not isinstance(file_records, list):
                raise DataError(f"{path}: expected a JSON array of records or JSON Lines")
            records.extend((path, index, raw) for index, raw in enumerate(file_records))
            files.append(path)
        read = len(records)
        if source.max_samples is not None:
            records = records[:int(source.max_samples)]
        if not records:
            raise DataError(f"{source.input_glob}: no records")
        per_source.append(records)
        summaries.append({"input_glob": os.fspath(source.input_glob), "weight": source.weight,
                          "max_samples": source.max_samples, "records_read": read})
    probs = probabilities(sources) if strategy != "concat" else None
    order = mix_order([len(r) for r in per_source], strategy, probs, seed)
    for number, summary in enumerate(summaries):
        summary["probability"] = probs[number] if probs is not None else None
    return MixedRecords([per_source[s][i] for s, i in order], [s for s, _ in order], summaries, files)
