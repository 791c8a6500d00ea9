"""The training run, as a recipe: context → config checks → model → weights → data →
optimizer and schedule → the loop → checkpoints and final weights.

`run(config)` is what `run_mindformer.py` calls; train and finetune are the same code (the
config decides: finetune loads a checkpoint and has a labels column), eval measures loss and
perplexity, predict is handed to `mindsft.predict`.
"""
import dataclasses
import json
import math
import os
import time

import mindspore as ms
from mindspore import Tensor

from mindsft.data.schema import dataset_manifest
from mindsft.errors import ConfigError, MindsftError
from mindsft.models.llama import LlamaForCausalLM
from mindsft.models.weights import assign_weights
from mindsft.train import checkpoint as ckpt
from mindsft.train.data import ShardedBatches
from mindsft.train.monitor import TrainingMonitor, plot_loss
from mindsft.train.schedule import build_lr_schedule
from mindsft.train.step import AdamWUpdate, EvalStep, TrainStep

OPTIMIZER_STATE_PREFIXES = ("adam_m.", "adam_v.", "accum_grad.")
STATE_KEYS = ("global_step", "loss_scale", "good_steps", "epoch_num", "step_num")


def run(config):
    """Run `config.run_mode`: train/finetune → train(), eval → evaluate(), predict → mindsft.predict."""
    if config.run_mode in ("train", "finetune"):
        return train(config)
    if config.run_mode == "eval":
        return evaluate(config)
    try:
        from mindsft import predict
    except ImportError:
        raise MindsftError("run_mode predict is not built yet (mindsft.predict is missing); "
                           "use train, finetune or eval") from None
    return predict.run(config)


# ---------------------------------------------------------------------------- context and checks

def check_parallel_settings(config):
    """Settings MindSpore cannot honour on this device, refused before any work starts."""
    if not config.use_parallel:
        return
    device = config.context.device_target
    pc, mode = config.parallel_config, config.parallel
    if device == "CPU":
        refused = [(pc.model_parallel > 1, f"parallel_config.model_parallel {pc.model_parallel}"),
                   (pc.pipeline_stage > 1, f"parallel_config.pipeline_stage {pc.pipeline_stage}"),
                   (mode.enable_parallel_optimizer, "parallel.enable_parallel_optimizer True"),
                   (pc.use_seq_parallel, "parallel_config.use_seq_parallel True")]
        for bad, setting in refused:
            if bad:
                raise ConfigError(f"{setting}: MindSpore's semi-auto parallel (tensor/pipeline/optimizer sharding) "
                                  "only runs on Ascend/GPU; on CPU only data parallel is possible "
                                  "(set it to 1/False and use data_parallel)")


def mindspore_context_settings(context):
    """The YAML's `context` keys that differ from their defaults, as `ms.set_context` takes them
    (mode and device are set on their own); None values are MindSpore's own defaults."""
    settings = {}
    for field in dataclasses.fields(context):
        if field.name in ("mode", "device_target", "device_id"):
            continue
        value = getattr(context, field.name)
        if value is not None and value != field.default:
            settings[field.name] = value
    return settings


def setup_context(config):
    """Device, graph mode, seed, and the data-parallel group. Returns (rank, world_size)."""
    check_parallel_settings(config)
    ms.set_context(mode=ms.GRAPH_MODE if config.context.mode == 0 else ms.PYNATIVE_MODE)
    ms.set_device(config.context.device_target)
    context_settings = mindspore_context_settings(config.context)
    if context_settings:
        ms.set_context(**context_settings)
    ms.set_seed(config.seed)
    if not config.use_parallel:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init
    try:
        init()
    except Exception as exc:  # MindSpore raises RuntimeError/ValueError without its launcher's environment
        raise ConfigError(f"use_parallel True needs the msrun launcher (scripts/msrun_launcher.sh): {exc}") from None
    rank, world_size = get_rank(), get_group_size()
    pc = config.parallel_config
    if pc.data_parallel * pc.model_parallel * pc.pipeline_stage != world_size:
        raise ConfigError(f"parallel_config: data_parallel {pc.data_parallel} x model_parallel {pc.model_parallel} "
                          f"x pipeline_stage {pc.pipeline_stage} = "
                          f"{pc.data_parallel * pc.model_parallel * pc.pipeline_stage}, but {world_size} workers run")
    if config.context.device_target != "CPU" and (pc.model_parallel > 1 or pc.pipeline_stage > 1):
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.SEMI_AUTO_PARALLEL, device_num=world_size,
                                     pipeline_stages=pc.pipeline_stage,
                                     enable_parallel_optimizer=config.parallel.enable_parallel_optimizer)
    return rank, world_size


# ---------------------------------------------------------------------------- model and weights

def build_model(config):
    """The Llama of `model.model_config`, with LoRA adapters when pet_config / finetuning_type asks;
    with quantization_bit, its base is quantized while it loads from load_checkpoint (QLoRA)."""
    if config.quantization_bit:
        from mindsft import qlora
        model = qlora.build_quantized_base(config)
    else:
        model = LlamaForCausalLM(config.llama_config)
    if config.pet_config or config.finetuning_type == "lora":
        from mindsft import lora
        if config.pet_config:
            lora_config = lora.LoraConfig.from_mindformers(config.pet_config)
        else:
            lora_config = lora.LoraConfig.from_llamafactory(
                {k: getattr(config, k) for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target")
                 if getattr(config, k) is not None})
        lora.apply_lora(model, lora_config, seed=config.seed)
        print(lora.parameter_report(model)[2])
    return model


def uses_lora(model):
    return getattr(model, "lora_config", None) is not None


def load_weights(model, path):
    """Model weights from a .ckpt (a converted model or a training checkpoint: optimizer state ignored)."""
    arrays = ckpt.load_checkpoint_arrays(path)
    weights = {name: value for name, value in arrays.items()
               if not name.startswith(OPTIMIZER_STATE_PREFIXES) and name not in STATE_KEYS}
    # LoRA adapters are new parameters the base checkpoint cannot hold.
    required = {p.name for p in model.get_parameters() if "lora_" not in p.name}
    missing = sorted(required - set(weights))
    if missing:
        raise ConfigError(f"{path}: tensors missing for the model: {', '.join(missing)}")
    assign_weights(model, weights, source=path, strict=False)


def restore_training_state(model, optimizer, path):
    """Weights, optimizer moments and counters from a training checkpoint; returns the counters."""
    arrays = ckpt.load_checkpoint_arrays(path)
    missing = [name for name in optimizer.state() if name not in arrays]
    missing += [key for key in STATE_KEYS if key not in arrays]
    if missing:
        raise ConfigError(f"{path}: not a training checkpoint, it lacks {', '.join(missing[:5])}")
    assign_weights(model, {p.name: arrays[p.name] for p in model.get_parameters() if p.name in arrays},
                   source=path, strict=False)
    for name, param in optimizer.state().items():
        param.set_data(arrays[name].astype(ms.float32))
    return {key: arrays[key].asnumpy().item() for key in STATE_KEYS}


def resume_checkpoint_dir(config):
    if isinstance(config.resume_training, str) and config.resume_training:
        return config.resume_training
    if config.load_checkpoint and os.path.isdir(os.path.join(config.load_checkpoint, "rank_0")):
        return config.load_checkpoint
    return config.checkpoint_dir


# ---------------------------------------------------------------------------- data

def build_data(config, dataset, rank, world_size, train=True):
    model_config = config.llama_config
    return ShardedBatches(
        dataset.data_loader.dataset_dir, model_config.seq_length, config.runner_config.batch_size,
        data_parallel=world_size, rank=rank,
        accumulation_steps=config.runner_config.gradient_accumulation_steps if train else 1,
        shuffle=dataset.data_loader.shuffle if train else False, seed=config.seed,
        drop_remainder=dataset.drop_remainder if train else False,
        pad_token_id=model_config.pad_token_id, ignore_index=model_config.ignore_index,
        what="train_dataset" if train else "eval_dataset")


def loss_scale_settings(config):
    """(initial scale, factor, window) for fp16; None when computing in fp32/bf16 (no scaling)."""
    if config.llama_config.compute_dtype != "float16":
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
    data = build_data(config, config.train_dataset, rank, world_size)
    eval_data = None
    if config.do_eval:
        eval_data = build_data(config, config.eval_dataset, rank, world_size, train=False)
    model = build_model(config)
    base_loaded = config.quantization_bit is not None  # a quantized base is read while it is built
    if config.load_checkpoint and not config.resume_training and not base_loaded:
        load_weights(model, ckpt.find_weights_file(config.load_checkpoint, rank))
    elif config.load_checkpoint and config.resume_training and not os.path.isdir(config.load_checkpoint) \
            and not base_loaded:
        load_weights(model, ckpt.find_weights_file(config.load_checkpoint, rank))

    params = model.trainable_params()
    opt = config.optimizer
    scaling = loss_scale_settings(config)
    optimizer = AdamWUpdate(params, opt.beta1, opt.beta2, opt.eps, opt.weight_decay,
                            skip_on_overflow=scaling is not None)
    wrapper = config.runner_wrapper
    train_step = TrainStep(model, params, optimizer,
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

    tokens_per_step = data.global_batch * config.llama_config.seq_length
    first_of_run = True
    loss = float("nan")
    start_epoch, start_in_epoch = divmod(state["global_step"], data.steps_per_epoch)
    for epoch in range(start_epoch, config.runner_config.epochs):
        for micro_batches in data.epoch(epoch, start_in_epoch if epoch == start_epoch else 0):
            lr = lr_at(state["global_step"])
            started = time.perf_counter()
            loss, grad_norm, finite = train_step.step(micro_batches, lr, state["loss_scale"])
            seconds = time.perf_counter() - started
            state["global_step"] += 1
            used_scale = state["loss_scale"]
            if scaling is not None:
                update_loss_scale(state, finite, scaling)
            monitor.log_step({"step": state["global_step"], "epoch": epoch + 1, "loss": loss, "lr": lr,
                              "grad_norm": grad_norm, "loss_scale": used_scale, "overflow": not finite,
                              "tokens": tokens_per_step, "samples": data.global_batch}, seconds, first_of_run)
            first_of_run = False
            step_in_epoch = state["global_step"] - epoch * data.steps_per_epoch
            if checkpoint_settings and state["global_step"] % checkpoint_settings.save_checkpoint_steps == 0:
                save_state(config, checkpoint_dir, rank, model, optimizer, state, epoch, step_in_epoch)
            if eval_data is not None and config.eval_step_interval > 0 \
                    and state["global_step"] % config.eval_step_interval == 0:
                eval_loss, perplexity = evaluate_loss(model, eval_data, world_size)
                monitor.log_eval(state["global_step"], eval_loss, perplexity)
    monitor.close()
    if checkpoint_settings and state["global_step"] % checkpoint_settings.save_checkpoint_steps != 0:
        save_state(config, checkpoint_dir, rank, model, optimizer, state, config.runner_config.epochs - 1,
                   data.steps_per_epoch)
    final_path = None
    if is_main:
        prefix = checkpoint_settings.prefix if checkpoint_settings else "llama"
        if uses_lora(model):
            from mindsft import lora
            final_path = ckpt.save_weights(save_params(model, checkpoint_settings),
                                           os.path.join(checkpoint_dir, f"{prefix}_final_lora.ckpt"))
            peft_dir = os.path.join(config.output_dir, "peft_adapter")
            lora.save_peft_adapter(model, peft_dir)
            print(f"LoRA adapters: {final_path} (PEFT format: {peft_dir}); merge into the base with "
                  f"tools/merge_lora.py --base {config.load_checkpoint or 'BASE.ckpt'} --adapter {peft_dir} "
                  f"--output merged.ckpt")
        else:
            final_path = ckpt.save_weights(save_params(model, checkpoint_settings),
                                           os.path.join(checkpoint_dir, f"{prefix}_final.ckpt"))
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
        keep_max=settings.keep_checkpoint_max)


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
    if config.template:
        return config.template
    manifest = dataset_manifest(config.train_dataset.data_loader.dataset_dir) or {}
    return manifest.get("template")


def write_run_summary(config, data, total_steps, world_size, model):
    os.makedirs(config.output_dir, exist_ok=True)
    summary = {"template": training_template(config), "records": data.num_records, "dropped_per_epoch": data.dropped_per_epoch,
               "global_batch": data.global_batch, "steps_per_epoch": data.steps_per_epoch,
               "total_steps": total_steps, "workers": world_size,
               "trainable_params": sum(int(p.size) for p in model.trainable_params()),
               "config": config.to_dict()}
    with open(os.path.join(config.output_dir, "run_summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print(f"{data.num_records} records ({data.dropped_per_epoch} dropped per epoch), global batch "
          f"{data.global_batch} on {world_size} worker(s), {data.steps_per_epoch} steps/epoch, {total_steps} steps")


def evaluate_loss(model, data, world_size):
    """(token-mean loss, perplexity) over a whole dataset, summed over ranks."""
    eval_step = EvalStep(model, world_size)
    loss_sum, count = 0.0, 0.0
    for micro_batches in data.epoch(0):
        for input_ids, labels in micro_batches:
            part_sum, part_count = eval_step(Tensor(input_ids), Tensor(labels))
            loss_sum += float(part_sum.asnumpy())
            count += float(part_count.asnumpy())
    loss = loss_sum / max(count, 1.0)
    return loss, math.exp(min(loss, 700.0))


def evaluate(config):
    """run_mode eval: loss and perplexity of `load_checkpoint` over the eval dataset."""
    rank, world_size = setup_context(config)
    data = build_data(config, config.eval_dataset, rank, world_size, train=False)
    model = build_model(config)
    if not config.load_checkpoint:
        raise ConfigError("run_mode eval needs --load_checkpoint (the weights to evaluate)")
    if config.quantization_bit is None:
        load_weights(model, ckpt.find_weights_file(config.load_checkpoint, rank))
    loss, perplexity = evaluate_loss(model, data, world_size)
    result = {"eval_loss": loss, "eval_perplexity": perplexity, "records": data.num_records}
    if rank == 0:
        os.makedirs(config.output_dir, exist_ok=True)
        with open(os.path.join(config.output_dir, "eval_results.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(f"eval: loss {loss:.6f} perplexity {perplexity:.4f} over {data.num_records} records")
    return result
