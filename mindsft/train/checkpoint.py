"""Training checkpoints: `checkpoint/rank_{r}/{prefix}_rank_{r}-{step}.ckpt` plus `meta.json`.

A checkpoint holds the weights, the optimizer moments (`adam_m.<param>`, `adam_v.<param>`,
MindFormers' names), `global_step`, `loss_scale`, and the data position (`epoch_num`,
`step_num` within the epoch). It is written under a temporary name and renamed; `meta.json`
is rewritten (also atomically) only after that, so a kill at any moment leaves `meta.json`
naming a complete checkpoint.
"""
import json
import os
import re

import numpy as np
import mindspore as ms

from mindsft.errors import ConfigError
from mindsft.files import atomic_output, remove_path

META_FILE = "meta.json"


def rank_dir(checkpoint_dir, rank):
    return os.path.join(checkpoint_dir, f"rank_{rank}")


def checkpoint_name(prefix, rank, step):
    return f"{prefix}_rank_{rank}-{step}.ckpt"


def checkpoint_steps(checkpoint_dir, rank):
    """{step: path} of the complete checkpoints of one rank (temporary files are not listed)."""
    folder = rank_dir(checkpoint_dir, rank)
    pattern = re.compile(rf"^(?P<prefix>.+)_rank_{rank}-(?P<step>\d+)\.ckpt$")
    found = {}
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            match = pattern.match(name)
            if match:
                found[int(match.group("step"))] = os.path.join(folder, name)
    return found


def write_checkpoint_file(entries, path):
    """ms.save_checkpoint to a hidden temporary `.ckpt` beside `path`, then rename onto it."""
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    # MindSpore appends ".ckpt" to names without it, so the temporary name keeps the suffix.
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.partial.ckpt")
    try:
        ms.save_checkpoint(entries, tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def write_meta(checkpoint_dir, rank, meta):
    path = os.path.join(rank_dir(checkpoint_dir, rank), META_FILE)
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)


def read_meta(checkpoint_dir, rank):
    path = os.path.join(rank_dir(checkpoint_dir, rank), META_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def save_training_checkpoint(checkpoint_dir, rank, prefix, step, params, optimizer_state, state, keep_max=None):
    """Write one rank's checkpoint for `step`, point meta.json at it, drop the oldest beyond keep_max.

    params: Parameters to save (all weights, or the trainable ones only); optimizer_state:
    {name: Parameter}; state: {name: number} (global_step, loss_scale, epoch_num, step_num, ...).
    """
    entries = [{"name": p.name, "data": p} for p in params]
    entries += [{"name": name, "data": value} for name, value in optimizer_state.items()]
    entries += [{"name": name, "data": ms.Tensor(np.asarray(value))} for name, value in state.items()]
    name = checkpoint_name(prefix, rank, step)
    write_checkpoint_file(entries, os.path.join(rank_dir(checkpoint_dir, rank), name))
    write_meta(checkpoint_dir, rank, {"last_step": int(step), "checkpoint": name,
                                      **{k: float(v) if isinstance(v, float) else int(v) for k, v in state.items()}})
    if keep_max and keep_max > 0:
        steps = sorted(checkpoint_steps(checkpoint_dir, rank))
        for old in steps[:-keep_max]:
            remove_path(checkpoint_steps(checkpoint_dir, rank)[old])


def save_weights(params, path):
    """A weights-only checkpoint of `params` (all weights, or only trainable ones for LoRA)."""
    write_checkpoint_file([{"name": p.name, "data": p} for p in params], path)
    return path


def resume_step(checkpoint_dir, world_size):
    """The newest step for which every rank has a complete checkpoint, or None."""
    common = None
    for rank in range(world_size):
        steps = set(checkpoint_steps(checkpoint_dir, rank))
        meta = read_meta(checkpoint_dir, rank)
        if meta is not None:
            # Checkpoints newer than meta.json were renamed but never recorded: not trusted.
            steps = {s for s in steps if s <= meta["last_step"]}
        common = steps if common is None else common & steps
    return max(common) if common else None


def load_checkpoint_arrays(path):
    """{name: Parameter} of a .ckpt file, with the file named in the error if it is unreadable."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: checkpoint file does not exist")
    try:
        return ms.load_checkpoint(path)
    except Exception as exc:   # MindSpore raises ValueError/RuntimeError for damaged files
        raise ConfigError(f"{path}: not a readable MindSpore checkpoint ({exc})") from None


def find_weights_file(load_checkpoint, rank=0):
    """The .ckpt to start from: the file itself, or the single .ckpt in a folder (or its rank_{r})."""
    if os.path.isfile(load_checkpoint):
        return load_checkpoint
    if not os.path.isdir(load_checkpoint):
        raise ConfigError(f"load_checkpoint {load_checkpoint}: no such file or folder")
    for folder in (os.path.join(load_checkpoint, f"rank_{rank}"), load_checkpoint):
        if os.path.isdir(folder):
            ckpts = sorted(n for n in os.listdir(folder) if n.endswith(".ckpt") and not n.startswith("."))
            if len(ckpts) == 1:
                return os.path.join(folder, ckpts[0])
            if len(ckpts) > 1:
                raise ConfigError(f"load_checkpoint {folder}: holds {len(ckpts)} checkpoints ({', '.join(ckpts)}); "
                                  "name the file")
    raise ConfigError(f"load_checkpoint {load_checkpoint}: no .ckpt file in it")
