"""HuggingFace ⇄ MindSpore checkpoint conversion that streams: tensors go from file to file in
blocks, so peak memory stays near one block whatever the model's size.

`hf_to_ms`: a HuggingFace Llama folder (safetensors or .bin, single or sharded) → one `.ckpt`
with MindFormers' names. `ms_to_hf`: a `.ckpt` (ours, MindFormers', or a training checkpoint
whose optimizer state is skipped) → a HuggingFace folder that transformers loads.
"""
import collections
import dataclasses
import json
import os
import re
import resource
import shutil
import time

from mindsft.convert import dtypes
from mindsft.convert.ckpt_format import CkptWriter, read_ckpt
from mindsft.convert.hf_reader import find_weights, open_hf_weights, read_hf_config
from mindsft.convert.safetensors_format import write_safetensors
from mindsft.convert.stored import split_stored, stacked
from mindsft.errors import ConfigError, ConvertError
from mindsft.output_files import atomic_output, check_output_path
from mindsft.models.families import family_of, model_config_from_hf
from mindsft.models.families.base import check_weights

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
# What ms_to_hf writes: an existing output folder holding only these may be replaced.
_HF_OUTPUT_FILE = re.compile(r"^(config\.json|generation_config\.json|model\.safetensors(\.index\.json)?|"
                             r"model-\d+-of-\d+\.safetensors|" + "|".join(map(re.escape, TOKENIZER_FILES)) + ")$")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def hf_to_ms(input_path, output_path, dtype=None, progress=True, config_path=None):
    """Convert a HuggingFace model (folder or weights file, config.json beside it) to a `.ckpt`.

    `dtype` ('fp32', 'fp16', 'bf16', or None to keep each tensor's own) sets the output dtype.
    With `config_path`, the model's config (HuggingFace `config.json` form) is written there too,
    so the checkpoint carries its model (see `model_config_path`). Returns the summary dict
    (see `format_summary`).
    """
    started = time.time()
    dtype = dtypes.canonical(dtype)
    output_path = os.fspath(output_path)
    check_output_path(output_path)
    if config_path:
        check_output_path(config_path)
    weights_path, hf_config_path = find_weights(input_path)
    hf_config = read_hf_config(hf_config_path)
    try:
        model_config = model_config_from_hf(hf_config, hf_config_path)
        family = family_of(model_config)
    except ConfigError as exc:
        message = str(exc)
        raise ConvertError(message if hf_config_path in message else f"{hf_config_path}: {message}") from None
    source = open_hf_weights(weights_path)
    entries = family.weight_entries(model_config)
    known = {entry.hf_name for entry in entries}

    weights, skipped, unknown = {}, collections.Counter(), []
    for hf_name, tensor in source.items():
        if family.hf_ignored(hf_name):
            skipped["rotary inv_freq buffers"] += 1
        elif hf_name == "lm_head.weight" and model_config.tie_word_embeddings:
            skipped["lm_head.weight (tied to the embedding)"] += 1
        elif hf_name not in known:
            unknown.append(f"{hf_name} (in {os.path.basename(tensor.file)})")
        else:
            weights[hf_name] = tensor
    if unknown:
        raise ConvertError(f"{weights_path}: {len(unknown)} tensor(s) the {family.name} weight map does not "
                           f"know: {', '.join(sorted(unknown))}")
    check_file_weights({e.hf_name: e.hf_shape for e in entries}, weights, hf_config_path, model_config)

    tensors = split_stored(entries, weights)
    with _progress_bar(sum(t.nbytes for t in weights.values()), "hf→ckpt", progress) as bar, \
            atomic_output(output_path) as tmp:
        with CkptWriter(tmp) as writer:
            for ms_name, tensor in tensors.items():
                out_dtype = dtype or tensor.dtype
                writer.write(ms_name, out_dtype, tensor.shape, tensor.blocks(out_dtype))
                bar.update(tensor.nbytes)
        if config_path:
            write_model_config(model_config, config_path, dtype)
    return _summary("hf_to_ms", input_path, output_path, list(tensors.values()), dtype, skipped, started)


def ms_to_hf(input_ckpt, output_dir, model_config, dtype=None, max_shard_size="5GB", tokenizer_dir=None,
             progress=True, overwrite=False):
    """Convert a MindSpore `.ckpt` to a HuggingFace folder: safetensors shards (+ index when
    more than one), config.json and generation_config.json from `model_config`, and the
    tokenizer files of `tokenizer_dir` when given. Non-model entries (optimizer state,
    global_step, ...) are skipped and counted. An existing non-empty `output_dir` is replaced
    only with `overwrite`, and only if it holds nothing but a conversion's files. Returns the summary dict.
    """
    started = time.time()
    dtype = dtypes.canonical(dtype)
    shard_limit = parse_size(max_shard_size)
    output_dir = os.path.normpath(os.fspath(output_dir))
    _check_replaceable(output_dir)
    check_output_path(output_dir, folder=True, overwrite=overwrite)
    tokenizer_files = _tokenizer_files(tokenizer_dir) if tokenizer_dir else []
    family = family_of(model_config)
    entries = family.weight_entries(model_config)
    shapes = family.weight_shapes(model_config)
    tensors, others = read_ckpt(input_ckpt)

    weights, skipped = {}, collections.Counter()
    for name, tensor in tensors.items():
        if name == "lm_head.weight" and model_config.tie_word_embeddings:
            skipped["lm_head.weight (tied to the embedding)"] += 1
        elif name in shapes or name.startswith(("model.", "lm_head.")):
            weights[name] = tensor
        else:
            skipped[_entry_group(name)] += 1
    for name, _ in others:
        skipped[_entry_group(name)] += 1
    check_file_weights(shapes, weights, "the model config", model_config)
    hf_tensors = [stacked(e.hf_name, [weights[n] for n in e.ms_names]) if e.is_split
                  else dataclasses.replace(weights[e.ms_names[0]], name=e.hf_name) for e in entries]
    out_dtype_of = {t.name: dtype or t.dtype for t in hf_tensors}
    shards = plan_shards(hf_tensors, shard_limit, out_dtype_of)

    total_in = sum(t.nbytes for t in hf_tensors)
    with _progress_bar(total_in, "ckpt→hf", progress) as bar, \
            atomic_output(output_dir, folder=True, overwrite=overwrite) as tmp:
        os.makedirs(tmp)
        weight_map = {}
        for index, shard in enumerate(shards, 1):
            file_name = "model.safetensors" if len(shards) == 1 else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            entries_out = [(t.name, out_dtype_of[t.name], t.shape, _counted(t, out_dtype_of[t.name], bar))
                           for t in shard]
            write_safetensors(os.path.join(tmp, file_name), entries_out, metadata={"format": "pt"})
            weight_map.update({name: file_name for name, *_ in entries_out})
        if len(shards) > 1:
            total_size = sum(t.numel * dtypes.itemsize(out_dtype_of[t.name]) for t in hf_tensors)
            _write_json(os.path.join(tmp, "model.safetensors.index.json"),
                        {"metadata": {"total_size": total_size}, "weight_map": weight_map})
        main_dtype = out_dtype_of[hf_tensors[0].name]
        _write_json(os.path.join(tmp, "config.json"), family.config_to_hf(model_config, main_dtype))
        _write_json(os.path.join(tmp, "generation_config.json"),
                    {"bos_token_id": model_config.bos_token_id, "eos_token_id": model_config.eos_token_id})
        for path in tokenizer_files:
            shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
    summary = _summary("ms_to_hf", input_ckpt, output_dir, hf_tensors, dtype, skipped, started)
    summary["shards"] = len(shards)
    return summary


def model_config_path(ckpt_path):
    """Where the model's config travels with a checkpoint: `model.ckpt` → `model.config.json`
    (HuggingFace's config.json layout, so any HF tool reads it too)."""
    path = os.fspath(ckpt_path)
    for suffix in (".ckpt", ".safetensors"):
        if path.endswith(suffix):
            return path[:-len(suffix)] + ".config.json"
    return path + ".config.json"


def write_model_config(model_config, path, dtype=None):
    """Write a LlamaConfig as its family's `config.json` mapping, atomically."""
    with atomic_output(path) as tmp:
        _write_json(tmp, family_of(model_config).config_to_hf(model_config, dtypes.canonical(dtype)))
    return path


def read_model_config(path):
    """The LlamaConfig of a `*.config.json` (or any HuggingFace config.json)."""
    return model_config_from_hf(read_hf_config(path), path)


def parse_size(size):
    """'5GB' → 5·10⁹ bytes, '500MiB' → 500·2²⁰, as transformers reads max_shard_size; ints pass."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
    if not match:
        raise ConvertError(f"max_shard_size {size!r} is not a size such as 5GB or 500MB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])


def plan_shards(tensors, limit, out_dtype_of):
    """Group tensors, in order, into shards of at most `limit` bytes (a bigger tensor goes alone)."""
    shards, current, current_bytes = [], [], 0
    for tensor in tensors:
        nbytes = tensor.numel * dtypes.itemsize(out_dtype_of[tensor.name])
        if current and current_bytes + nbytes > limit:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(tensor)
        current_bytes += nbytes
    if current:
        shards.append(current)
    return shards


def format_summary(summary):
    """One line a person reads after a conversion."""
    skipped = summary["skipped"]
    skipped_text = (", skipped " + ", ".join(f"{n} {what}" for what, n in sorted(skipped.items()))) if skipped else ""
    return (f"{summary['output']}: {summary['tensors']} tensors, {summary['parameters']:,} parameters, "
            f"{summary['bytes'] / 2**20:,.1f} MiB read in {summary['seconds']:.1f} s, "
            f"peak RSS {summary['peak_rss_bytes'] / 2**20:,.0f} MiB{skipped_text}")


def check_file_weights(shapes, weights, config_source, model_config):
    """Every tensor a file must hold for the config, with its shape, and nothing else; floats only."""
    def shape_text(name, got, want):
        return f"{name} {list(got)} in {os.path.basename(weights[name].file)} (expected {list(want)})"
    check_weights(shapes, {n: t.shape for n, t in weights.items()}, config_source, model_config, shape_text,
                  phrases=("tensor(s) missing for the config", "tensor(s) beyond the config's layers",
                           f"shape(s) disagree with {config_source}"))
    not_float = [f"{n} ({t.dtype})" for n, t in weights.items() if t.dtype not in dtypes.FLOAT_DTYPES]
    if not_float:
        raise ConvertError(f"tensors that are not floating point: {', '.join(not_float)}")


def _counted(tensor, dtype, bar):
    for block in tensor.blocks(dtype):
        bar.update(block.size * dtypes.itemsize(tensor.dtype))
        yield block


def _entry_group(name):
    # adam_m.model.layers.0... → adam_m; global_step → global_step
    return name.split(".", 1)[0]


def _check_replaceable(output_dir):
    if os.path.isfile(output_dir):
        raise ConvertError(f"{output_dir} is a file; give a folder for the HuggingFace model")
    if os.path.isdir(output_dir):
        foreign = [n for n in os.listdir(output_dir) if not _HF_OUTPUT_FILE.match(n)]
        if foreign:
            raise ConvertError(f"{output_dir} exists and holds files a conversion does not write "
                               f"({', '.join(sorted(foreign)[:5])}); choose a new folder")


def _tokenizer_files(tokenizer_dir):
    if not os.path.isdir(tokenizer_dir):
        raise ConvertError(f"{tokenizer_dir}: tokenizer folder not found")
    files = [os.path.join(tokenizer_dir, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, n))]
    if not files:
        raise ConvertError(f"{tokenizer_dir}: holds none of {', '.join(TOKENIZER_FILES)}")
    return files


def _write_json(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _progress_bar(total, what, enabled):
    from tqdm import tqdm
    return tqdm(total=total, desc=what, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                dynamic_ncols=True)


def _summary(direction, source, output, tensors, dtype, skipped, started):
    return {
        "direction": direction,
        "input": os.fspath(source),
        "output": os.fspath(output),
        "tensors": len(tensors),
        "parameters": sum(t.numel for t in tensors),
        "bytes": sum(t.nbytes for t in tensors),
        "dtype": dtype or "as stored",
        "skipped": dict(skipped),
        "seconds": time.time() - started,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def peak_rss_bytes():
    """This process's peak resident memory, imports included."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork+exec, so a
    # converter started from a big process would report the parent's peak.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
