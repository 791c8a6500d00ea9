"""Training checkpoints: `checkpoint/rank_{r}/{prefix}_rank_{r}-{step}.ckpt` (or `.safetensors`,
`checkpoint_format: safetensors` of the CheckpointMonitor, MindFormers 1.5+) plus `meta.json`.

A checkpoint holds the weights, the optimizer moments (`adam_m.<param>`, `adam_v.<param>`,
MindFormers' names), `global_step`, `loss_scale`, and the data position (`epoch_num`,
`step_num` within the epoch). It is written under a temporary name and renamed; `meta.json`
is rewritten (also atomically) only after that, so a kill at any moment leaves `meta.json`
naming a complete checkpoint. Files are written and read by mindsft.convert.ckpt_format, whose
checksum trailer (MindSpore's crc_check format) is verified before any value is used: resume
skips a damaged checkpoint for the newest intact one, and says which it skipped.
"""
import json
import os
import re
import sys

import numpy as np
import mindspore as ms

from mindsft.convert import dtypes
from mindsft.convert.ckpt_format import verify_ckpt, write_arrays
from mindsft.convert.safetensors_format import verify_safetensors, write_checked_safetensors
from mindsft.errors import ConvertError
from mindsft.output_files import atomic_output, remove_partials, remove_path
from mindsft.weights import SUFFIXES

META_FILE = "meta.json"


def rank_dir(checkpoint_dir, rank):
    return os.path.join(checkpoint_dir, f"rank_{rank}")


def checkpoint_name(prefix, rank, step, checkpoint_format="ckpt"):
    return f"{prefix}_rank_{rank}-{step}{SUFFIXES[checkpoint_format]}"


def checkpoint_steps(checkpoint_dir, rank):
    """{step: path} of the complete checkpoints of one rank (temporary files are not listed)."""
    folder = rank_dir(checkpoint_dir, rank)
    pattern = re.compile(rf"^(?P<prefix>.+)_rank_{rank}-(?P<step>\d+)\.(ckpt|safetensors)$")
    found = {}
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            match = pattern.match(name)
            if match:
                found[int(match.group("step"))] = os.path.join(folder, name)
    return found


def storage_array(value):
    """(dtype name, storage array) of a MindSpore Tensor/Parameter or a number, as ckpt_format writes it."""
    if isinstance(value, ms.Tensor):
        if value.dtype == ms.bfloat16:  # asnumpy has no bfloat16: widen exactly, then keep the bits
            return "bfloat16", dtypes.convert(value.astype(ms.float32).asnumpy(), "float32", "bfloat16")
        value = value.asnumpy()
    array = np.asarray(value)
    return dtypes.canonical(array.dtype.name), array


def write_checkpoint_file(entries, path):
    """[(name, Tensor or number)] as a `.ckpt` (or `.safetensors`) at `path`, through a temporary name."""
    write = write_checked_safetensors if path.endswith(".safetensors") else write_arrays
    with atomic_output(path) as tmp:
        write(tmp, [(name, *storage_array(value)) for name, value in entries])


def verify_checkpoint(path):
    """Raise ConvertError if the file's checksums say it is damaged."""
    return verify_safetensors(path) if path.endswith(".safetensors") else verify_ckpt(path)


def write_meta(checkpoint_dir, rank, meta):
    path = os.path.join(rank_dir(checkpoint_dir, rank), META_FILE)
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)


def read_meta(checkpoint_dir, rank, warn=True):
    """meta.json of one rank, or None when it is absent or unreadable (then the checkpoints
    themselves, verified by their checksums, say which is the newest complete one)."""
    path = os.path.join(rank_dir(checkpoint_dir, rank), META_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or not isinstance(meta.get("last_step"), int):
            raise ValueError("no integer last_step")
    except (OSError, ValueError, RecursionError) as exc:
        if warn:
            print(f"warning: {path} is damaged ({' '.join(str(exc).split())[:80]}); "
                  "taking the newest intact checkpoint instead", file=sys.stderr)
        return None
    return meta


def save_training_checkpoint(checkpoint_dir, rank, prefix, step, params, optimizer_state, state, keep_max=None,
                             checkpoint_format="ckpt"):
    """Write one rank's checkpoint for `step`, point meta.json at it, drop the oldest beyond keep_max.

    params: Parameters to save (all weights, or the trainable ones only); optimizer_state:
    {name: Parameter}; state: {name: number} (global_step, loss_scale, epoch_num, step_num, ...).
    """
    entries = [(p.name, p) for p in params]
    entries += list(optimizer_state.items())
    entries += [(name, np.asarray(value)) for name, value in state.items()]
    name = checkpoint_name(prefix, rank, step, checkpoint_format)
    write_checkpoint_file(entries, os.path.join(rank_dir(checkpoint_dir, rank), name))
    write_meta(checkpoint_dir, rank, {"last_step": int(step), "checkpoint": name,
                                      **{k: float(v) if isinstance(v, float) else int(v) for k, v in state.items()}})
    if keep_max and keep_max > 0:
        steps = sorted(checkpoint_steps(checkpoint_dir, rank))
        for old in steps[:-keep_max]:
            remove_path(checkpoint_steps(checkpoint_dir, rank)[old])


def save_weights(params, path):
    """A weights-only checkpoint of `params` (all weights, or only trainable ones for LoRA)."""
    write_checkpoint_file([(p.name, p) for p in params], path)
    return path


def find_resume_step(checkpoint_dir, world_size, verify=True):
    """(newest step for which every rank has a complete, intact checkpoint or None, [what was
    skipped and why]). Every rank checks every rank's files, so all agree without talking."""
    common = None
    for rank in range(world_size):
        steps = set(checkpoint_steps(checkpoint_dir, rank))
        meta = read_meta(checkpoint_dir, rank, warn=rank == 0 or world_size == 1)
        if meta is not None:
            # Checkpoints newer than meta.json were renamed but never recorded: not trusted.
            steps = {s for s in steps if s <= meta["last_step"]}
        common = steps if common is None else common & steps
    skipped = []
    for step in sorted(common or (), reverse=True):
        damaged = []
        for rank in range(world_size):
            path = checkpoint_steps(checkpoint_dir, rank)[step]
            try:
                if verify:
                    verify_checkpoint(path)
            except ConvertError as exc:
                damaged.append(str(exc))
        if not damaged:
            return step, skipped
        skipped += damaged
    return None, skipped


def resume_step(checkpoint_dir, world_size):
    """The newest step for which every rank has a complete, intact checkpoint, or None; a
    skipped (damaged) checkpoint is named in a warning."""
    step, skipped = find_resume_step(checkpoint_dir, world_size)
    for reason in skipped:
        print(f"warning: resume skips {reason}", file=sys.stderr)
    return step


def remove_leftovers(checkpoint_dir, rank):
    """Delete the temporary files a killed run left in this rank's checkpoint folder."""
    return remove_partials(rank_dir(checkpoint_dir, rank))
