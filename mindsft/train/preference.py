"""Preference tuning (`stage: dpo`): the losses of DPO (sigmoid, hinge, ipo), ORPO and SimPO over
pairs of sequences, the reference model's log-probabilities, and the metrics TRL logs.

A batch of pairs (`mindsft.data.schema.PAIR_COLUMNS`) goes through the model in one forward,
chosen rows stacked over rejected ones. A sequence's log-probability is the sum over its learned
tokens (the reply and its end token); ipo, orpo and simpo use the per-token average, as TRL and
LLaMA-Factory define them:

- sigmoid: -(1-ε)·logσ(βΔ) - ε·logσ(-βΔ), Δ = (π_c - ref_c) - (π_r - ref_r), ε = dpo_label_smoothing
- hinge:   relu(1 - βΔ)
- ipo:     ((π_c - ref_c)/n_c - (π_r - ref_r)/n_r - 1/(2β))²
- orpo:    -π̄_c - β·logσ(log odds(π̄_c) - log odds(π̄_r)), π̄ the average log-probability
- simpo:   -logσ(β(π̄_c - π̄_r) - γ)
plus pref_ftx · (-π̄_c) (an SFT term on the chosen reply) when pref_ftx > 0.

Rewards are β·(π - ref) with a reference, β·π̄ without (orpo, simpo). The loss of a step is the
mean over the pairs of the global batch: `loss_terms` returns the sum over pairs and their count,
so data parallelism and accumulation split it as they split SFT's token mean (`train/step.py`).

The reference: a LoRA/QLoRA run's is its own base with the adapters off (`lora.adapters_disabled`,
no second copy of the weights); a full fine-tuning run's is a frozen copy of the start weights,
or, with `precompute_ref_log_probs`, one pass over the data before training whose results are
kept (in memory and in `reference_logps.npz` of the output folder, which a resumed run reads) so
no reference model is held during training.
"""
import contextlib
import dataclasses
import os

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindsft import lora
from mindsft.data.schema import IGNORE_INDEX, PAIR_COLUMNS
from mindsft.errors import ConfigError, DataError
from mindsft.loading import build_model, load_start_weights, uses_lora
from mindsft.output_files import atomic_output
from mindsft.train.batches import ShardedBatches
from mindsft.train.step import EvalStep, tensors_of
from mindsft.typed import nearest_hint

PREF_LOSSES = ("sigmoid", "hinge", "ipo", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")
AVERAGED = ("ipo", "orpo", "simpo")
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# The statistics a step sums (over valid pairs) before dividing by their count; names as TRL logs them.
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")
REFERENCE_FILE = "reference_logps.npz"


@dataclasses.dataclass
class PreferenceSettings:
    """What the preference loss reads of a run config (LLaMA-Factory's key names)."""
    pref_loss: str = "sigmoid"
    pref_beta: float = 0.1
    pref_ftx: float = 0.0
    simpo_gamma: float = 0.5
    dpo_label_smoothing: float = 0.0

    @classmethod
    def from_config(cls, config):
        return cls(**{field.name: getattr(config, field.name) for field in dataclasses.fields(cls)})

    @property
    def uses_reference(self):
        return self.pref_loss not in REFERENCE_FREE


def check_settings(settings):
    """One line naming the bad preference key, before anything is built."""
    if settings.pref_loss not in PREF_LOSSES:
        raise ConfigError(f"pref_loss {settings.pref_loss!r} is not one of {', '.join(PREF_LOSSES)}"
                          f"{nearest_hint(settings.pref_loss, PREF_LOSSES)}")
    if settings.pref_beta <= 0:
        raise ConfigError(f"pref_beta must be positive, got {settings.pref_beta}")
    if not 0 <= settings.dpo_label_smoothing < 0.5:
        raise ConfigError(f"dpo_label_smoothing must be in [0, 0.5), got {settings.dpo_label_smoothing}")
    if settings.dpo_label_smoothing and settings.pref_loss != "sigmoid":
        raise ConfigError(f"dpo_label_smoothing applies to pref_loss sigmoid, not {settings.pref_loss}")
    if settings.pref_ftx < 0:
        raise ConfigError(f"pref_ftx must be 0 (off) or positive, got {settings.pref_ftx}")


def log_sigmoid(x):
    return -ops.softplus(-x)


def sequence_log_probs(model, input_ids, labels, ignore_index=IGNORE_INDEX):
    """(sum of the log-probabilities of each row's learned targets [N], their count [N]), float32.
    Labels are aligned with input_ids (position t predicts labels[t + 1]), as in SFT."""
    hidden = model.model(input_ids)
    logits = model.logits_from_hidden(hidden[:, :-1])
    targets = labels[:, 1:].astype(ms.int32)
    learned = targets != ignore_index
    weights = learned.astype(ms.float32)
    fused = getattr(model, "fused_cross_entropy", None)
    if fused is not None:
        # The model's fused CPU cross-entropy (one pass over the logits each way; its backward
        # takes a gradient per token), as the SFT loss uses it: log p = -CE; a negative target is skipped.
        per_token, _ = fused(logits.reshape(-1, logits.shape[-1]),
                             ops.select(learned, targets, ops.full_like(targets, -1)).reshape(-1))
        return -(per_token.reshape(targets.shape) * weights).sum(1), weights.sum(1)
    safe_targets = ops.select(learned, targets, ops.zeros_like(targets))
    log_probs = ops.log_softmax(logits, -1)
    picked = ops.gather_elements(log_probs, 2, ops.expand_dims(safe_targets, -1)).squeeze(-1)
    return (picked * weights).sum(1), weights.sum(1)


class PreferenceLoss(nn.Cell):
    """`loss_terms(*pair columns[, ref_chosen_logps, ref_rejected_logps])` → (sum of the pairs'
    losses, count of pairs, statistics): what `TrainStep` and `EvalStep` take in place of a model.
    Statistics are the sums of METRICS over the pairs, then the pair count."""

    def __init__(self, model, settings):
        super().__init__(auto_prefix=False)
        check_settings(settings)
        self.model = model
        self.settings = settings
        self.loss_type = settings.pref_loss
        self.beta = settings.pref_beta
        self.ftx = settings.pref_ftx
        self.gamma = settings.simpo_gamma
        self.smoothing = settings.dpo_label_smoothing
        self.uses_reference = settings.uses_reference
        self.batch_columns = PAIR_COLUMNS + (REFERENCE_COLUMNS if self.uses_reference else ())

    def loss_terms(self, chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels,
                   ref_chosen_logps=None, ref_rejected_logps=None):
        pairs = chosen_input_ids.shape[0]
        logps, counts = sequence_log_probs(self.model, ops.concat((chosen_input_ids, rejected_input_ids), 0),
                                           ops.concat((chosen_labels, rejected_labels), 0))
        chosen_logps, rejected_logps = logps[:pairs], logps[pairs:]
        chosen_count, rejected_count = counts[:pairs], counts[pairs:]
        # Padding rows of a batch (a remainder) have nothing learned: they count for nothing.
        is_valid = ops.logical_and(chosen_count > 0, rejected_count > 0)
        valid = is_valid.astype(ms.float32)
        # Their log-probabilities (0) are replaced before any loss sees them: orpo's log(1 - e^0)
        # would be -inf, and 0 · inf is NaN in the sum and its gradient.
        stand_in = ops.full_like(chosen_logps, -1.0)
        chosen_logps = ops.select(is_valid, chosen_logps, stand_in)
        rejected_logps = ops.select(is_valid, rejected_logps, stand_in)
        chosen_avg = chosen_logps / ops.maximum(chosen_count, 1.0)
        rejected_avg = rejected_logps / ops.maximum(rejected_count, 1.0)
        losses, chosen_rewards, rejected_rewards, chosen_shown, rejected_shown = self.pair_losses(
            chosen_logps, rejected_logps, chosen_count, rejected_count, chosen_avg, rejected_avg,
            ref_chosen_logps, ref_rejected_logps)
        if self.ftx > 0:
            losses = losses - self.ftx * chosen_avg
        chosen_rewards = ops.stop_gradient(chosen_rewards)
        rejected_rewards = ops.stop_gradient(rejected_rewards)
        accuracies = (chosen_rewards > rejected_rewards).astype(ms.float32)
        per_pair = (chosen_rewards, rejected_rewards, accuracies, chosen_rewards - rejected_rewards,
                    ops.stop_gradient(chosen_shown), ops.stop_gradient(rejected_shown))
        sums = ()
        for value in per_pair:
            sums += ((value * valid).sum(),)
        count = valid.sum()
        statistics = ops.stack(sums + (count,))
        return (losses * valid).sum(), count, statistics

    def pair_losses(self, chosen_logps, rejected_logps, chosen_count, rejected_count, chosen_avg, rejected_avg,
                    ref_chosen_logps, ref_rejected_logps):
        """(per-pair loss, chosen rewards, rejected rewards, chosen logps shown, rejected logps shown)."""
        beta = self.beta
        if self.loss_type == "orpo":
            log_odds = (chosen_avg - rejected_avg) - (ops.log1p(-ops.exp(chosen_avg))
                                                      - ops.log1p(-ops.exp(rejected_avg)))
            losses = -chosen_avg - beta * log_sigmoid(log_odds)
            return losses, beta * chosen_avg, beta * rejected_avg, chosen_avg, rejected_avg
        if self.loss_type == "simpo":
            losses = -log_sigmoid(beta * (chosen_avg - rejected_avg) - self.gamma)
            return losses, beta * chosen_avg, beta * rejected_avg, chosen_avg, rejected_avg
        chosen_ratio = chosen_logps - ref_chosen_logps
        rejected_ratio = rejected_logps - ref_rejected_logps
        delta = chosen_ratio - rejected_ratio
        if self.loss_type == "sigmoid":
            losses = -(1.0 - self.smoothing) * log_sigmoid(beta * delta) - self.smoothing * log_sigmoid(-beta * delta)
        elif self.loss_type == "hinge":
            losses = ops.relu(1.0 - beta * delta)
        else:  # ipo: the log-ratios averaged over each reply's tokens (TRL's normalisation)
            ipo_delta = (chosen_ratio / ops.maximum(chosen_count, 1.0)
                         - rejected_ratio / ops.maximum(rejected_count, 1.0))
            losses = (ipo_delta - 1.0 / (2.0 * beta)) ** 2
        return losses, beta * chosen_ratio, beta * rejected_ratio, chosen_logps, rejected_logps


def metrics_of(statistics, prefix=""):
    """{TRL's metric name: mean over the pairs} of a statistics vector (sums, then the count)."""
    if statistics is None:
        return {}
    values = np.asarray(statistics[0] if isinstance(statistics, (list, tuple)) else statistics, np.float64)
    count = max(float(values[-1]), 1.0)
    return {prefix + name: float(value / count) for name, value in zip(METRICS, values[:-1])}


# ---------------------------------------------------------------------------- the reference

class PairLogProbs(nn.Cell):
    """(chosen, rejected) summed log-probabilities [B] of a batch of pairs, in one forward."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels):
        pairs = chosen_input_ids.shape[0]
        logps, _ = sequence_log_probs(self.model, ops.concat((chosen_input_ids, rejected_input_ids), 0),
                                      ops.concat((chosen_labels, rejected_labels), 0))
        return logps[:pairs], logps[pairs:]


class LiveReference:
    """Reference log-probabilities computed for each batch: by `model` with its LoRA adapters off
    (`adapters_off`), or by a frozen copy of the start weights."""

    def __init__(self, model, adapters_off=False):
        self.model = model
        self.adapters_off = adapters_off
        self.log_probs = PairLogProbs(model)
        self.log_probs.set_train(False)

    def __call__(self, batch):
        context = lora.adapters_disabled(self.model) if self.adapters_off else contextlib.nullcontext()
        with context:
            chosen, rejected = self.log_probs(*(Tensor(batch[name]) for name in PAIR_COLUMNS))
        return chosen.asnumpy(), rejected.asnumpy()

    def fill(self, batch):
        """The batch with its reference columns added."""
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = self(batch)
        return batch


class PrecomputedReference:
    """Reference log-probabilities of every record, looked up by the batch's `record_index`."""

    def __init__(self, chosen, rejected):
        self.chosen, self.rejected = np.asarray(chosen, np.float32), np.asarray(rejected, np.float32)

    @classmethod
    def compute(cls, live, records):
        """One pass of `live` over `records` (a ShardedBatches of the whole dataset, in order)."""
        chosen = np.zeros(records.num_records, np.float32)
        rejected = np.zeros(records.num_records, np.float32)
        for batch in records.batches():
            index = batch["record_index"]
            values = live(batch)
            real = index >= 0
            chosen[index[real]], rejected[index[real]] = values[0][real], values[1][real]
        return cls(chosen, rejected)

    def fill(self, batch):
        index = batch["record_index"]
        real = index >= 0
        batch["ref_chosen_logps"] = np.where(real, self.chosen[np.maximum(index, 0)], 0.0).astype(np.float32)
        batch["ref_rejected_logps"] = np.where(real, self.rejected[np.maximum(index, 0)], 0.0).astype(np.float32)
        return batch

    def save(self, path, eval_reference=None):
        arrays = {"chosen": self.chosen, "rejected": self.rejected}
        if eval_reference is not None:
            arrays.update(eval_chosen=eval_reference.chosen, eval_rejected=eval_reference.rejected)
        with atomic_output(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

    @classmethod
    def load(cls, path, num_records, eval_records=None):
        """(train reference, eval reference or None) saved by `save`; checked against the data."""
        try:
            arrays = np.load(path)
            train = cls(arrays["chosen"], arrays["rejected"])
            evaluation = cls(arrays["eval_chosen"], arrays["eval_rejected"]) if "eval_chosen" in arrays else None
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{path}: not a reference log-probability file ({err}); delete it to compute "
                            "the reference again") from None
        if len(train.chosen) != num_records or (eval_records is not None and
                                                (evaluation is None or len(evaluation.chosen) != eval_records)):
            raise DataError(f"{path}: holds reference log-probabilities of other data ({len(train.chosen)} "
                            f"records, the train data has {num_records}); delete it to compute them again")
        return train, evaluation


def check_pairwise(data, what):
    if not data.pairwise:
        raise DataError(f"{what}: {data.dataset_dir} holds no preference pairs (stage: dpo needs records "
                        "written by llama_preprocess --dataset_type pairwise)")


def evaluate_preference(loss_cell, batches, reference=None, world_size=1):
    """(mean preference loss, {"eval_rewards/...": ...}) over `batches`, summed over ranks first."""
    eval_step = EvalStep(loss_cell, world_size)
    eval_step.set_train(False)
    loss_sum, statistics = 0.0, None
    for batch in batches:
        if reference is not None:
            reference.fill(batch)
        part_sum, _, part_statistics = eval_step(*tensors_of(batch, eval_step.columns))
        loss_sum += float(part_sum.asnumpy())
        part_statistics = part_statistics.asnumpy().astype(np.float64)
        statistics = part_statistics if statistics is None else statistics + part_statistics
    count = max(float(statistics[-1]), 1.0) if statistics is not None else 1.0
    return loss_sum / count, metrics_of(statistics, prefix="eval_")


def reference_path(config):
    return os.path.join(config.output_dir, REFERENCE_FILE)


def whole_dataset(data, batch_size):
    """Every record of `data`'s dataset once, in order, on this rank (the precompute pass)."""
    return ShardedBatches(data.dataset_dir, data.record_length - 1, batch_size, shuffle=False, drop_remainder=False,
                          pad_to_multiple_of=data.pad_to_multiple_of, what="reference pass")


def build_reference(config, model, settings, data, eval_data, rank):
    """(reference of the train batches, of the eval batches): None when the loss uses none; the
    model with its adapters off under LoRA; else a frozen copy of the start weights; with
    precompute_ref_log_probs, the log-probabilities of one pass before training (by the model as it
    starts when no copy is needed). Under data parallelism every rank makes the whole pass (the
    same numbers, no exchange needed) and rank 0 writes the file."""
    if not settings.uses_reference:
        return None, None
    if uses_lora(model):
        live = LiveReference(model, adapters_off=True)
    elif config.precompute_ref_log_probs:
        live = LiveReference(model)  # called before the first step: the start weights
    else:
        copy = build_model(config)
        load_start_weights(copy, config, rank)
        for param in copy.get_parameters():
            param.requires_grad = False
        live = LiveReference(copy)
    if not config.precompute_ref_log_probs:
        return live, live
    path = reference_path(config)
    if config.resume_training and os.path.isfile(path):
        train, evaluation = PrecomputedReference.load(path, data.num_records,
                                                      eval_data.num_records if eval_data is not None else None)
        return train, evaluation
    if config.resume_training and not uses_lora(model) and config.load_checkpoint \
            and os.path.isdir(os.path.join(config.load_checkpoint, "rank_0")):
        raise ConfigError(f"precompute_ref_log_probs: resuming from {config.load_checkpoint} without the "
                          f"{REFERENCE_FILE} of the first run in output_dir {config.output_dir}; the start "
                          "weights are not loaded, so the reference cannot be computed again")
    batch_size = config.runner_config.batch_size
    train = PrecomputedReference.compute(live, whole_dataset(data, batch_size))
    evaluation = PrecomputedReference.compute(live, whole_dataset(eval_data, batch_size)) \
        if eval_data is not None else None
    if rank == 0:
        os.makedirs(config.output_dir, exist_ok=True)
        train.save(path, evaluation)
        print(f"reference log-probabilities of {data.num_records} pairs precomputed: {path}")
    return train, evaluation
