"""Loss and perplexity over a dataset: what eval during training, run_mode eval and predict's
scoring of labelled records all compute, in one place."""
import copy
import json
import math
import os

from mindsft.errors import ConfigError
from mindsft.output_files import atomic_output
from mindsft.generation_eval import GenerationEval
from mindsft.loading import build_model, load_start_weights, uses_lora
from mindsft.train import preference
from mindsft.train.batches import build_data
from mindsft.train.context import setup_context
from mindsft.train.step import EvalStep, tensors_of


def evaluate_loss(model, batches, world_size=1):
    """(token-mean loss, perplexity) of the learned tokens of `batches` (dicts of named columns),
    summed over data-parallel ranks before the division."""
    loss_sum, count = loss_terms_over(model, batches, world_size)
    loss = loss_sum / max(count, 1.0)
    return loss, math.exp(min(loss, 700.0))


def loss_terms_over(model, batches, world_size=1):
    """(summed cross-entropy, learned-token count) over `batches`."""
    eval_step = EvalStep(model, world_size)
    loss_sum, count = 0.0, 0.0
    for batch in batches:
        part_sum, part_count = eval_step(*tensors_of(batch))
        loss_sum += float(part_sum.asnumpy())
        count += float(part_count.asnumpy())
    return loss_sum, count


def evaluate(config):
    """run_mode eval: loss and perplexity of `load_checkpoint` over the eval dataset."""
    if not (config.load_checkpoint or config.pretrained_model_dir):
        raise ConfigError("run_mode eval needs --load_checkpoint (the weights to evaluate)")
    rank, world_size = setup_context(config)
    data = build_data(config, config.eval_dataset, rank, world_size, train=False)
    model = build_model(config)
    load_start_weights(model, config, rank)
    if config.stage == "dpo":
        return evaluate_pairs(config, model, data, rank, world_size)
    loss, perplexity = evaluate_loss(model, data.batches(), world_size)
    result = {"eval_loss": loss, "eval_perplexity": perplexity, "records": data.num_records}
    if config.eval_dataset.predict_with_generate and rank == 0:
        result.update(GenerationEval.from_config(config, model, data.files)())
    if rank == 0:
        os.makedirs(config.output_dir, exist_ok=True)
        with atomic_output(os.path.join(config.output_dir, "eval_results.json")) as tmp:
            with open(tmp, "w") as f:
                json.dump(result, f, indent=2)
        print(f"eval: loss {loss:.6f} perplexity {perplexity:.4f} over {data.num_records} records")
    return result


def evaluate_pairs(config, model, data, rank, world_size):
    """run_mode eval with stage dpo: the preference loss and TRL's metrics over the eval pairs."""
    settings = preference.PreferenceSettings.from_config(config)
    preference.check_settings(settings)
    preference.check_pairwise(data, "eval_dataset")
    if settings.uses_reference and not uses_lora(model):
        # The weights evaluated are all that is loaded: a reference would be the same weights.
        raise ConfigError(f"run_mode eval with stage dpo and pref_loss {settings.pref_loss} needs a reference: "
                          "evaluate a LoRA adapter (its base is the reference) or use pref_loss orpo or simpo")
    live_config = copy.copy(config)
    live_config.precompute_ref_log_probs = False
    reference, _ = preference.build_reference(live_config, model, settings, data, None, rank)
    loss, metrics = preference.evaluate_preference(preference.PreferenceLoss(model, settings), data.batches(),
                                                   reference, world_size)
    result = {"eval_loss": loss, **metrics, "records": data.num_records}
    if rank == 0:
        os.makedirs(config.output_dir, exist_ok=True)
        with atomic_output(os.path.join(config.output_dir, "eval_results.json")) as tmp:
            with open(tmp, "w") as f:
                json.dump(result, f, indent=2)
        shown = " ".join(f"{name[len('eval_'):]} {value:.4f}" for name, value in metrics.items())
        print(f"eval: loss {loss:.6f} {shown} over {data.num_records} pairs")
    return result
