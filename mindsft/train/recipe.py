"""The training run, as a recipe: context → data → model → weights → optimizer and schedule →
the loop → checkpoints and final weights.

train and finetune are the same code (the config decides: finetune loads a checkpoint and has a
labels column), and stage dpo is the same loop with the preference loss of `train/preference.py`
in the step and each batch's reference log-probabilities added before it. One step of training
passes through `train/batches.py` (the micro-batches), `train/step.py` (the compiled forward,
backward and AdamW update) and `models/llama.py`.
"""
import json
import os
import time

from mindsft.convert.convert import model_config_path, write_model_config
from mindsft.data.schema import recorded_template
from mindsft.output_files import atomic_output, remove_partials
from mindsft import lora
from mindsft.loading import build_model, load_start_weights, restore_training_state, uses_lora
from mindsft.generation_eval import GenerationEval
from mindsft.train import checkpoint as ckpt
from mindsft.train.batches import build_data
from mindsft.train.context import setup_context
from mindsft.train.evaluate import evaluate_loss
from mindsft.train import preference
from mindsft.train.monitor import CompileTally, TrainingMonitor, plot_loss
from mindsft.train.schedule import build_lr_schedule
from mindsft.train.step import AdamWUpdate, TrainStep

# ---------------------------------------------------------------------------- data

def resume_checkpoint_dir(config):
    if isinstance(config.resume_training, str) and config.resume_training:
        return config.resume_training
    if config.load_checkpoint and os.path.isdir(os.path.join(config.load_checkpoint, "rank_0")):
        return config.load_checkpoint
    return config.checkpoint_dir


def loss_scale_settings(config):
    """(initial scale, factor, window) for fp16; None when computing in fp32/bf16 (no scaling)."""
    if config.model_config.compute_dtype != "float16":
        return None
    sense = config.runner_wrapper.scale_sense
    if isinstance(sense, (int, float)):
        return float(sense), 1.0, 0
    if sense.type == "FixedLossScaleUpdateCell":
        return sense.loss_scale_value, 1.0, 0
    return sense.loss_scale_value, sense.scale_factor, sense.scale_window


# ---------------------------------------------------------------------------- the run

def train(config):
    """Fine-tune (or pretrain) per `config`; returns {"final_loss", "steps", "final_checkpoint"}."""
    rank, world_size = setup_context(config)
    is_main = rank == 0
    # stage dpo: the step's loss is the preference loss over pairs, and each batch gets the
    # reference log-probabilities it needs (train/preference.py); the loop is the same.
    pair_settings = preference.PreferenceSettings.from_config(config) if config.stage == "dpo" else None
    if pair_settings is not None:
        preference.check_settings(pair_settings)
    data = build_data(config, config.train_dataset, rank, world_size)
    eval_data = None
    if config.do_eval:
        eval_data = build_data(config, config.eval_dataset, rank, world_size, train=False)
    if pair_settings is not None:
        preference.check_pairwise(data, "train_dataset")
        if eval_data is not None:
            preference.check_pairwise(eval_data, "eval_dataset")
    model = build_model(config)
    if config.recompute_config.recompute:
        model.recompute_layers()
    if not (config.resume_training and config.load_checkpoint and os.path.isdir(config.load_checkpoint)):
        load_start_weights(model, config, rank)
    loss_cell, reference, eval_reference = model, None, None
    if pair_settings is not None:
        loss_cell = preference.PreferenceLoss(model, pair_settings)
        reference, eval_reference = preference.build_reference(config, model, pair_settings, data, eval_data, rank)
    # Only rank 0 reports, so only it generates (the others wait for it at the next step). Pairs
    # have no single reply to score: a dpo run's eval is its preference loss and metrics.
    generation_eval = None
    if eval_data is not None and config.eval_dataset.predict_with_generate and is_main and pair_settings is None:
        generation_eval = GenerationEval.from_config(config, model, eval_data.files)

    params = model.trainable_params()
    opt = config.optimizer
    scaling = loss_scale_settings(config)
    optimizer = AdamWUpdate(params, opt.beta1, opt.beta2, opt.eps, opt.weight_decay,
                            skip_on_overflow=scaling is not None)
    wrapper = config.runner_wrapper
    train_step = TrainStep(loss_cell, params, optimizer,
                           max_grad_norm=wrapper.max_grad_norm if wrapper.use_clip_grad else None,
                           world_size=world_size, accumulation_steps=config.runner_config.gradient_accumulation_steps,
                           check_overflow=scaling is not None)
    total_steps = data.steps_per_epoch * config.runner_config.epochs
    lr_at = build_lr_schedule(config.lr_schedule, opt.learning_rate, total_steps)

    state = {"global_step": 0, "loss_scale": scaling[0] if scaling else 1.0, "good_steps": 0}
    checkpoint_dir = config.checkpoint_dir
    resumed = False
    if config.resume_training:
        source_dir = resume_checkpoint_dir(config)
        if os.path.abspath(source_dir) == os.path.abspath(checkpoint_dir):
            # Only this run's own folders: another run's may be live, its temporary files in use.
            ckpt.remove_leftovers(source_dir, rank)
            if is_main:
                remove_partials(config.output_dir)
        step = ckpt.resume_step(source_dir, world_size)
        if step is None:
            if is_main:
                print(f"resume_training: no checkpoint every rank completed in {source_dir}; starting at step 0")
        else:
            path = ckpt.checkpoint_steps(source_dir, rank)[step]
            restored = restore_training_state(model, optimizer, path)
            state.update(global_step=int(restored["global_step"]), loss_scale=float(restored["loss_scale"]),
                         good_steps=int(restored["good_steps"]))
            resumed = True
            if is_main:
                print(f"resumed from {path} at step {state['global_step']}")

    checkpoint_settings = config.callbacks.checkpoint
    monitor = TrainingMonitor(config.output_dir, total_steps, state["global_step"], is_main,
                              config.callbacks.per_print_times, resume=resumed)
    if is_main:
        write_run_summary(config, data, total_steps, world_size, model)

    # A pair is two sequences.
    tokens_per_step = data.global_batch * config.model_config.seq_length * (2 if pair_settings else 1)
    first_of_run = True
    compile_tally = CompileTally()
    loss = float("nan")
    start_epoch, start_in_epoch = divmod(state["global_step"], data.steps_per_epoch)
    for epoch in range(start_epoch, config.runner_config.epochs):
        for micro_batches in data.epoch(epoch, start_in_epoch if epoch == start_epoch else 0):
            lr = lr_at(state["global_step"])
            started = time.perf_counter()
            if reference is not None:
                for batch in micro_batches:
                    reference.fill(batch)
            loss, grad_norm, finite = train_step.step(micro_batches, lr, state["loss_scale"])
            seconds = time.perf_counter() - started
            compile_tally.add(micro_batches[0][data.columns[0]].shape, seconds)
            state["global_step"] += 1
            used_scale = state["loss_scale"]
            if scaling is not None:
                update_loss_scale(state, finite, scaling)
            monitor.log_step({"step": state["global_step"], "epoch": epoch + 1, "loss": loss, "lr": lr,
                              "grad_norm": grad_norm, "loss_scale": used_scale, "overflow": not finite,
                              "tokens": tokens_per_step, "samples": data.global_batch,
                              **preference.metrics_of(train_step.last_statistics)}, seconds, first_of_run)
            first_of_run = False
            step_in_epoch = state["global_step"] - epoch * data.steps_per_epoch
            # A step's eval comes before its checkpoint, so a run resumed from step N (stopped
            # during or after N's eval) has N's eval logged.
            if eval_data is not None and config.eval_step_interval > 0 \
                    and state["global_step"] % config.eval_step_interval == 0:
                if pair_settings is not None:
                    eval_loss, scores = preference.evaluate_preference(loss_cell, eval_data.batches(),
                                                                       eval_reference, world_size)
                    monitor.log_eval(state["global_step"], eval_loss, None, scores)
                else:
                    eval_loss, perplexity = evaluate_loss(model, eval_data.batches(), world_size)
                    scores = generation_eval() if generation_eval is not None else {}
                    monitor.log_eval(state["global_step"], eval_loss, perplexity, scores)
            if checkpoint_settings and state["global_step"] % checkpoint_settings.save_checkpoint_steps == 0:
                save_state(config, checkpoint_dir, rank, model, optimizer, state, epoch, step_in_epoch)
    monitor.close()
    if is_main and data.pad_to_multiple_of:
        print(f"bucketed batches: the step was compiled for {len(data.lengths_seen)} lengths "
              f"{sorted(data.lengths_seen)} (pad_to_multiple_of {data.pad_to_multiple_of})")
    if is_main and compile_tally.seconds:
        print(compile_tally.summary())
    if checkpoint_settings and state["global_step"] % checkpoint_settings.save_checkpoint_steps != 0:
        save_state(config, checkpoint_dir, rank, model, optimizer, state, config.runner_config.epochs - 1,
                   data.steps_per_epoch)
    final_path = None
    if is_main:
        prefix = checkpoint_settings.prefix if checkpoint_settings else "llama"
        suffix = ckpt.SUFFIXES[checkpoint_settings.checkpoint_format if checkpoint_settings else "ckpt"]
        if uses_lora(model):
            final_path = ckpt.save_weights(save_params(model, checkpoint_settings),
                                           os.path.join(checkpoint_dir, f"{prefix}_final_lora{suffix}"))
            peft_dir = os.path.join(config.output_dir, "peft_adapter")
            lora.save_peft_adapter(model, peft_dir)
            print(f"LoRA adapters: {final_path} (PEFT format: {peft_dir}); merge into the base with "
                  f"tools/merge_lora.py --base {config.load_checkpoint or 'BASE.ckpt'} --adapter {peft_dir} "
                  f"--output merged.ckpt")
        else:
            final_path = ckpt.save_weights(save_params(model, checkpoint_settings),
                                           os.path.join(checkpoint_dir, f"{prefix}_final{suffix}"))
            # The final weights carry their model, so predict and merge need no shape in the YAML.
            write_model_config(config.model_config, model_config_path(final_path))
        png = plot_loss(monitor.metrics_path)
        print(f"final weights: {final_path}\nmetrics: {monitor.metrics_path}\nloss curve: {png}")
    return {"final_loss": loss, "steps": state["global_step"], "final_checkpoint": final_path}


def save_params(model, checkpoint_settings):
    """What a checkpoint holds: every weight, or only the trainable ones (always so under LoRA:
    the frozen base is the load_checkpoint it started from, and adapters are a small fraction)."""
    if uses_lora(model) or (checkpoint_settings and checkpoint_settings.save_trainable_params):
        return model.trainable_params()
    return model.get_parameters()


def save_state(config, checkpoint_dir, rank, model, optimizer, state, epoch, step_in_epoch):
    settings = config.callbacks.checkpoint
    ckpt.save_training_checkpoint(
        checkpoint_dir, rank, settings.prefix, state["global_step"], list(save_params(model, settings)),
        optimizer.state(), {"global_step": state["global_step"], "loss_scale": float(state["loss_scale"]),
                            "good_steps": state["good_steps"], "epoch_num": epoch, "step_num": step_in_epoch},
        keep_max=settings.keep_checkpoint_max, checkpoint_format=settings.checkpoint_format)


def update_loss_scale(state, finite, scaling):
    """MindSpore's DynamicLossScaleUpdateCell, on the host: halve on overflow, double after a clean window."""
    _, factor, window = scaling
    if not finite:
        state["loss_scale"] = max(state["loss_scale"] / factor, 1.0)
        state["good_steps"] = 0
        return
    state["good_steps"] += 1
    if window and state["good_steps"] >= window:
        state["loss_scale"] *= factor
        state["good_steps"] = 0


def training_template(config):
    """The prompt template of the training data: the config's, else the one llama_preprocess recorded."""
    return config.template or recorded_template(config.train_dataset.data_loader.dataset_dir)[0]


def write_run_summary(config, data, total_steps, world_size, model):
    os.makedirs(config.output_dir, exist_ok=True)
    summary = {"template": training_template(config), "records": data.num_records, "dropped_per_epoch": data.dropped_per_epoch,
               "global_batch": data.global_batch, "steps_per_epoch": data.steps_per_epoch,
               "total_steps": total_steps, "workers": world_size,
               "trainable_params": sum(int(p.size) for p in model.trainable_params()),
               "config": config.to_dict()}
    with atomic_output(os.path.join(config.output_dir, "run_summary.json")) as tmp:
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2, default=str)
    print(f"{data.num_records} records ({data.dropped_per_epoch} dropped per epoch), global batch "
          f"{data.global_batch} on {world_size} worker(s), {data.steps_per_epoch} steps/epoch, {total_steps} steps")
