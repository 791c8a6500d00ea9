"""The MindSpore context of a run: device, graph mode, the YAML's `context` keys, the seed, and
the data-parallel group — with the parallel settings a device cannot honour refused first."""
import dataclasses

import mindspore as ms

from mindsft.errors import ConfigError


def check_parallel_settings(config):
    """Settings MindSpore cannot honour on this device, refused before any work starts; returns one
    line for each setting a CPU run takes as plain data parallel instead."""
    if not config.use_parallel:
        return []
    device = config.context.device_target
    pc, mode = config.parallel_config, config.parallel
    if device != "CPU":
        return []
    refused = [(pc.model_parallel > 1, f"parallel_config.model_parallel {pc.model_parallel}"),
               (pc.pipeline_stage > 1, f"parallel_config.pipeline_stage {pc.pipeline_stage}"),
               (pc.context_parallel > 1, f"parallel_config.context_parallel {pc.context_parallel}")]
    for bad, setting in refused:
        if bad:
            raise ConfigError(f"{setting}: MindSpore's semi-auto parallel (tensor/pipeline/optimizer sharding) "
                              "only runs on Ascend/GPU; on CPU only data parallel is possible "
                              "(set it to 1/False and use data_parallel)")
    notes = []
    if mode.parallel_mode in (1, 2, 3):
        # With model_parallel = pipeline_stage = 1 the only strategy semi-auto parallel can pick
        # is the data-parallel one, which the msrun workers run as it is.
        notes.append(f"parallel.parallel_mode {mode.parallel_mode} with data parallelism only: runs as data "
                     "parallel over the msrun workers")
    if mode.enable_parallel_optimizer:
        notes.append("parallel.enable_parallel_optimizer True: the optimizer state is not sharded on CPU; "
                     "each worker keeps all of it (the updates are the same)")
    if pc.use_seq_parallel:
        notes.append("parallel_config.use_seq_parallel True: no effect with model_parallel 1 (sequence "
                     "parallelism splits over the model-parallel group)")
    return notes


def mindspore_context_settings(context):
    """The YAML's `context` keys that differ from their defaults, as `ms.set_context` takes them
    (mode and device are set on their own); None values are MindSpore's own defaults."""
    settings = {}
    for field in dataclasses.fields(context):
        if field.name in ("mode", "device_target", "device_id", "max_call_depth"):  # set on their own
            continue
        value = getattr(context, field.name)
        if value is not None and value != field.default:
            settings[field.name] = value
    return settings


def setup_context(config):
    """Device, graph mode, seed, and the data-parallel group. Returns (rank, world_size)."""
    notes = check_parallel_settings(config)
    ms.set_context(mode=ms.GRAPH_MODE if config.context.mode == 0 else ms.PYNATIVE_MODE)
    ms.set_device(config.context.device_target)
    # Always: MindFormers' default call depth (10000) is not MindSpore's (1000), which a 22-layer
    # model with LoRA on every projection exceeds when the step compiles.
    ms.set_recursion_limit(config.context.max_call_depth)
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
    if pc.model_parallel == pc.pipeline_stage == 1 and pc.data_parallel != world_size:
        notes.append(f"parallel_config.data_parallel {pc.data_parallel}: {world_size} workers run, so data "
                     f"parallel is {world_size}")
        pc.data_parallel = world_size
    if rank == 0:
        for note in notes:
            print(note, flush=True)
    if pc.data_parallel * pc.model_parallel * pc.pipeline_stage != world_size:
        raise ConfigError(f"parallel_config: data_parallel {pc.data_parallel} x model_parallel {pc.model_parallel} "
                          f"x pipeline_stage {pc.pipeline_stage} = "
                          f"{pc.data_parallel * pc.model_parallel * pc.pipeline_stage}, but {world_size} workers run")
    if config.context.device_target != "CPU" and (pc.model_parallel > 1 or pc.pipeline_stage > 1):
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.SEMI_AUTO_PARALLEL, device_num=world_size,
                                     pipeline_stages=pc.pipeline_stage,
                                     enable_parallel_optimizer=config.parallel.enable_parallel_optimizer)
    return rank, world_size
