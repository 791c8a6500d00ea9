"""Learning-rate schedules with MindFormers' formulas, as plain functions of the step index.

The lr for update number `step` (0-based) is computed on the host and fed to the compiled
step, so resuming at step k gives exactly the lr an uninterrupted run had at step k.
"""
import math

from mindsft.errors import ConfigError


def warmup_steps_of(schedule, total_steps):
    if schedule.warmup_steps is not None:
        return int(schedule.warmup_steps)
    if schedule.warmup_ratio is not None:
        # MindFormers truncates: int(total_steps * warmup_ratio).
        return int(total_steps * schedule.warmup_ratio)
    return 0


def build_lr_schedule(schedule, base_lr, total_steps):
    """A function step → learning rate for `lr_schedule` settings over `total_steps` updates."""
    if schedule.total_steps not in (-1, None) and schedule.total_steps > 0:
        total_steps = int(schedule.total_steps)
    if total_steps < 1:
        raise ConfigError(f"lr_schedule: total_steps must be at least 1, got {total_steps}")
    lr = float(schedule.learning_rate if schedule.learning_rate is not None else base_lr)
    lr_end = float(schedule.lr_end)
    warmup = warmup_steps_of(schedule, total_steps)
    warmup_init = float(schedule.warmup_lr_init)
    decay_steps = int(schedule.decay_steps) if schedule.decay_steps else max(total_steps - warmup, 1)
    kind = schedule.type

    def lr_at(step):
        if step < warmup:
            # MindFormers' warmup is linear from warmup_lr_init, reaching lr at step == warmup.
            return warmup_init + (lr - warmup_init) * step / warmup
        if kind in ("constant", "ConstantWarmUpLR"):
            return lr
        progress = min((step - warmup) / decay_steps, 1.0)
        if kind == "CosineWithWarmUpLR":
            return lr_end + (lr - lr_end) * 0.5 * (1.0 + math.cos(math.pi * 2.0 * schedule.num_cycles * progress))
        if kind == "LinearWithWarmUpLR":
            return lr_end + (lr - lr_end) * (1.0 - progress)
        raise ConfigError(f"lr_schedule.type {kind!r} is not supported")

    return lr_at
