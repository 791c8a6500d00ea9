"""The run configuration: MindFormers' YAML schema (same key names), parsed once into typed
objects with command-line overrides applied, validated, then passed down.

Nothing below `load_run_config` reads YAML or the environment for settings. Keys a
MindFormers YAML carries that only tune Ascend speed are accepted (so a MindFormers user's
file reads unchanged) and ignored; any other key is an error naming the nearest known one.
"""
import copy
import dataclasses
import json
import os
import typing
from typing import Any, Dict, List, Optional, Union

import yaml

from mindsft.errors import ConfigError
from mindsft.generation_config import GenerationConfig
from mindsft.input_files import read_yaml
from mindsft.lora_config import LoraConfig
from mindsft.models.config import SHAPE_KEYS, LlamaConfig
from mindsft.models.families import family_named, family_of, model_config_from_hf
from mindsft.quant import QUANT_TYPES, QUANTIZATION_BITS, QUANTIZATION_METHODS
from mindsft.typed import build, coerce, nearest_hint, unwrap_optional
from mindsft.weights import find_model_config

RUN_MODES = ("train", "finetune", "eval", "predict")
# LLaMA-Factory's training stages that run here: pt and sft are the token loss (the data decides
# which tokens are learned), dpo the preference losses of mindsft.train.preference.
STAGES = ("pt", "sft", "dpo")
LR_SCHEDULES = ("CosineWithWarmUpLR", "LinearWithWarmUpLR", "ConstantWarmUpLR", "constant")
OPTIMIZERS = ("AdamWeightDecay", "FP32StateAdamWeightDecay", "AdamW")
# Callbacks we act on, and MindFormers callbacks accepted without effect here.
CALLBACK_TYPES = ("MFLossMonitor", "CheckpointMonitor", "SummaryMonitor", "ObsMonitor", "ProfileMonitor",
                  "EvalCallBack", "TrainingStateMonitor")


@dataclasses.dataclass
class RunnerConfig:
    epochs: int = 1
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    sink_mode: bool = True      # Ascend data sinking; the CPU loop always feeds step by step
    sink_size: int = 2
    initial_epoch: int = 0


@dataclasses.dataclass
class OptimizerConfig:
    type: str = "FP32StateAdamWeightDecay"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    betas: Optional[List[float]] = None   # LLaMA-Factory / newer MindFormers spelling of (beta1, beta2)


@dataclasses.dataclass
class LrScheduleConfig:
    type: str = "CosineWithWarmUpLR"
    learning_rate: Optional[float] = None   # None: the optimizer's
    lr_end: float = 0.0
    warmup_ratio: Optional[float] = None
    warmup_steps: Optional[int] = None
    warmup_lr_init: float = 0.0
    total_steps: int = -1                   # -1: derived from the data and epochs
    num_cycles: float = 0.5
    decay_steps: Optional[int] = None


@dataclasses.dataclass
class DataLoaderConfig:
    type: str = "MindDataset"
    dataset_dir: str = ""
    shuffle: bool = True
    dataset_files: Optional[List[str]] = None


@dataclasses.dataclass
class DatasetConfig:
    data_loader: DataLoaderConfig = dataclasses.field(default_factory=DataLoaderConfig)
    input_columns: List[str] = dataclasses.field(default_factory=lambda: ["input_ids", "labels"])
    drop_remainder: bool = True
    num_parallel_workers: int = 8
    python_multiprocessing: bool = False
    batch_size: Optional[int] = None        # runner_config.batch_size is the one used
    repeat: int = 1
    numa_enable: bool = False
    prefetch_size: int = 1
    output_columns: Optional[List[str]] = None
    construct_args_key: Optional[List[str]] = None   # which model argument each column feeds (Ascend)
    # eval_dataset only: also answer the first generate_samples records and score the replies
    # (BLEU-4, ROUGE) with generation_config's settings (mindsft/generation_eval.py).
    predict_with_generate: bool = False
    generate_samples: int = 16
    # mindsft: cut each batch of unpacked rows after its last learned token, rounded up to a
    # multiple of this many tokens (0: full seq_length + 1 rows, MindFormers' way); the step is
    # compiled once per length. Packed data ignores it. 128 from bench/sft_epoch.py: 2.5-4.3x the
    # learned tokens/s of full rows at seq_length 2048, at most 16 compiled lengths there.
    pad_to_multiple_of: int = 128


@dataclasses.dataclass
class ScaleSenseConfig:
    type: str = "DynamicLossScaleUpdateCell"
    loss_scale_value: float = 65536.0
    scale_factor: float = 2.0
    scale_window: int = 1000


@dataclasses.dataclass
class RunnerWrapperConfig:
    type: str = "MFTrainOneStepCell"
    scale_sense: Union[ScaleSenseConfig, float] = dataclasses.field(default_factory=ScaleSenseConfig)
    use_clip_grad: bool = True
    max_grad_norm: float = 1.0


@dataclasses.dataclass
class ParallelConfig:
    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    micro_batch_num: int = 1
    vocab_emb_dp: bool = True
    use_seq_parallel: bool = False
    gradient_aggregation_group: int = 4
    context_parallel: int = 1
    expert_parallel: int = 1


@dataclasses.dataclass
class ParallelModeConfig:
    parallel_mode: int = 0      # 0 data, 1 semi-auto, 2 auto, 3 hybrid
    gradients_mean: bool = False
    enable_alltoall: bool = False
    full_batch: bool = True
    search_mode: str = "sharding_propagation"
    enable_parallel_optimizer: bool = False
    strategy_ckpt_save_file: str = "./ckpt_strategy.ckpt"
    strategy_ckpt_config: Optional[Dict[str, Any]] = None
    parallel_optimizer_config: Optional[Dict[str, Any]] = None
    pipeline_config: Optional[Dict[str, Any]] = None


@dataclasses.dataclass
class RecomputeConfig:
    recompute: Any = False      # True, or layers per pipeline stage ([7, 7])
    select_recompute: Any = False
    parallel_optimizer_comm_recompute: bool = False
    mp_comm_recompute: bool = True
    recompute_slice_activation: bool = True
    select_comm_recompute: Any = False


@dataclasses.dataclass
class ModelSection:
    model_config: Dict[str, Any] = dataclasses.field(default_factory=dict)
    arch: Dict[str, Any] = dataclasses.field(default_factory=lambda: {"type": "LlamaForCausalLM"})


@dataclasses.dataclass
class CheckpointMonitorConfig:
    prefix: str = "llama"
    save_checkpoint_steps: int = 100
    keep_checkpoint_max: int = 5
    integrated_save: bool = False
    async_save: bool = False
    save_network_params: bool = False
    save_trainable_params: bool = False
    checkpoint_format: str = "ckpt"


@dataclasses.dataclass
class CallbacksConfig:
    """MindFormers' `callbacks` list, folded into the two we act on."""
    loss_monitor: bool = True
    # None: every step off a terminal, every few steps under the progress bar on one (train/monitor.py).
    per_print_times: Optional[int] = None
    checkpoint: Optional[CheckpointMonitorConfig] = None


@dataclasses.dataclass
class ContextConfig:
    mode: int = 0               # 0 graph (compiled step), 1 PyNative
    device_target: str = "CPU"
    device_id: int = 0
    max_device_memory: Optional[str] = None
    enable_graph_kernel: bool = False
    graph_kernel_flags: Optional[str] = None
    max_call_depth: int = 10000
    save_graphs: Any = False
    save_graphs_path: str = "./graph"
    jit_config: Optional[Dict[str, Any]] = None
    memory_optimize_level: Optional[str] = None
    runtime_num_threads: Optional[int] = None
    ascend_config: Optional[Dict[str, Any]] = None


@dataclasses.dataclass
class TokenizerConfig:
    type: str = "LlamaTokenizer"
    # A tokenizer.model (SentencePiece or tiktoken), a tokenizer.json, a HuggingFace folder, or
    # Qwen2's vocab.json with merges_file beside it (mindsft.tokenizer.load_tokenizer).
    vocab_file: Optional[str] = None
    merges_file: Optional[str] = None
    unk_token: Optional[str] = "<unk>"
    bos_token: Optional[str] = "<s>"
    eos_token: Optional[str] = "</s>"
    pad_token: Optional[str] = "<unk>"
    model_max_length: Optional[int] = None   # the model's seq_length is what bounds a sequence
    auto_register: Optional[str] = None      # MindFormers' research tokenizer classes are built in here


@dataclasses.dataclass
class ProcessorConfig:
    type: str = "LlamaProcessor"
    return_tensors: str = "ms"
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)


@dataclasses.dataclass
class RunConfig:
    seed: int = 0
    output_dir: str = "./output"
    run_mode: str = "train"
    load_checkpoint: Optional[str] = None
    resume_training: Union[bool, str] = False
    use_parallel: bool = False
    do_eval: bool = False
    eval_step_interval: int = -1
    eval_epoch_interval: int = -1
    runner_config: RunnerConfig = dataclasses.field(default_factory=RunnerConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    lr_schedule: LrScheduleConfig = dataclasses.field(default_factory=LrScheduleConfig)
    train_dataset: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)
    eval_dataset: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)
    runner_wrapper: RunnerWrapperConfig = dataclasses.field(default_factory=RunnerWrapperConfig)
    parallel_config: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    parallel: ParallelModeConfig = dataclasses.field(default_factory=ParallelModeConfig)
    recompute_config: RecomputeConfig = dataclasses.field(default_factory=RecomputeConfig)
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    callbacks: CallbacksConfig = dataclasses.field(default_factory=CallbacksConfig)
    context: ContextConfig = dataclasses.field(default_factory=ContextConfig)
    processor: ProcessorConfig = dataclasses.field(default_factory=ProcessorConfig)
    # MindFormers 1.5+: a HuggingFace folder (config.json, tokenizer, weights) to start from, and
    # the format of load_checkpoint (read by its suffix; the key says which a folder is searched for).
    pretrained_model_dir: Optional[str] = None
    load_ckpt_format: str = "ckpt"
    # Predict settings: HuggingFace generation_config.json keys; used by mindsft.predict.
    generation_config: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    predict_data: Optional[Any] = None
    template: Optional[str] = None
    # LoRA: LLaMA-Factory spellings, passed through to mindsft.lora (MindFormers' is model_config.pet_config).
    finetuning_type: str = "full"
    lora_rank: Optional[int] = None
    lora_alpha: Optional[float] = None
    lora_dropout: Optional[float] = None
    lora_target: Optional[Any] = None
    # QLoRA: LLaMA-Factory spellings; the base is quantized while it loads (mindsft.quantized_base).
    quantization_bit: Optional[int] = None
    quantization_type: str = "nf4"
    double_quantization: bool = True
    quantization_method: str = "bitsandbytes"
    # Preference tuning: LLaMA-Factory's keys (stage: dpo and pref_*), TRL's precompute_ref_log_probs.
    stage: str = "sft"
    pref_loss: str = "sigmoid"
    pref_beta: float = 0.1
    pref_ftx: float = 0.0
    simpo_gamma: float = 0.5
    dpo_label_smoothing: float = 0.0
    precompute_ref_log_probs: bool = False
    # Accepted MindFormers keys with no effect on a CPU/GPU run.
    trainer: Dict[str, Any] = dataclasses.field(default_factory=dict)
    train_dataset_task: Dict[str, Any] = dataclasses.field(default_factory=dict)
    eval_dataset_task: Dict[str, Any] = dataclasses.field(default_factory=dict)
    src_strategy_path_or_dir: Optional[str] = None
    auto_trans_ckpt: bool = False
    only_save_strategy: bool = False
    micro_batch_interleave_num: int = 1
    metric: Optional[Any] = None
    eval_callbacks: Optional[Any] = None
    moe_config: Optional[Dict[str, Any]] = None
    profile: bool = False
    profile_start_step: int = 1
    profile_stop_step: int = 10
    init_start_profile: bool = False
    profile_communication: bool = False
    profile_memory: bool = True
    layer_scale: bool = False
    layer_decay: float = 0.65
    lr_scale: bool = False
    lr_scale_factor: int = 256
    auto_tune: bool = False
    filepath_prefix: str = "./autotune"
    autotune_per_step: int = 10
    remote_save_url: Optional[str] = None   # ModelArts/OBS upload target
    # run_mindformer.py --register_path: MindFormers' research folder to import; the families are built in.
    register_path: Optional[str] = None

    # Built once by `build_run_config` from the sections above; not YAML keys.
    model_config: Optional[LlamaConfig] = dataclasses.field(default=None, init=False)
    lora: Optional[LoraConfig] = dataclasses.field(default=None, init=False)
    no_effect: List[str] = dataclasses.field(default_factory=list, init=False)
    # One line each about a setting taken differently from what the YAML says (printed by run.py).
    notes: List[str] = dataclasses.field(default_factory=list, init=False)

    @property
    def pet_config(self):
        return self.model.model_config.get("pet_config")

    @property
    def global_batch_size(self):
        """Samples per optimizer step over all data-parallel ranks and accumulation micro-steps."""
        dp = self.parallel_config.data_parallel if self.use_parallel else 1
        return self.runner_config.batch_size * dp * self.runner_config.gradient_accumulation_steps

    @property
    def checkpoint_dir(self):
        return os.path.join(self.output_dir, "checkpoint")

    def to_dict(self):
        return dataclasses.asdict(self)


def fold_callbacks(callbacks):
    """MindFormers' list of `{type: ..., ...}` callbacks → CallbacksConfig."""
    if isinstance(callbacks, dict):
        return build(CallbacksConfig, callbacks, "callbacks")
    folded = CallbacksConfig(loss_monitor=False)
    for index, callback in enumerate(callbacks or []):
        where = f"callbacks[{index}]"
        if not isinstance(callback, dict) or "type" not in callback:
            raise ConfigError(f"{where}: each callback is a mapping with a 'type'")
        kind = callback["type"]
        options = {k: v for k, v in callback.items() if k != "type"}
        if kind == "MFLossMonitor":
            folded.loss_monitor = True
            if "per_print_times" in options:
                folded.per_print_times = coerce(options.pop("per_print_times"), int, where + ".per_print_times")
        elif kind == "CheckpointMonitor":
            options.pop("directory", None)
            folded.checkpoint = build(CheckpointMonitorConfig, options, where)
        elif kind not in CALLBACK_TYPES:
            raise ConfigError(f"{where}: unknown callback type {kind!r}{nearest_hint(kind, CALLBACK_TYPES)}")
    return folded


def schema_has_section(parts):
    """Whether the dotted path names a nested section of the typed schema (so it may be created)."""
    cls = RunConfig
    for part in parts:
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return False
        types = unwrap_optional(hints[part])
        members = [m for m in types if dataclasses.is_dataclass(m)]
        if not members:
            # A free-form mapping section (generation_config) may be created, as its leaf's parent.
            return part == parts[-1] and any(typing.get_origin(t) is dict for t in types)
        cls = members[0]
    return True


def set_dotted(raw, dotted_key, value):
    """Set `a.b.c` in nested mappings (list items by index); intermediate keys must exist
    (or be sections of the schema, created empty, as eval_dataset.data_loader)."""
    parts = dotted_key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[:depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override --{dotted_key}: {where!r} is not an index of the list")
            node = node[int(part)]
            continue
        if not isinstance(node, dict) or part not in node or node[part] is None:
            if isinstance(node, dict) and schema_has_section(parts[:depth + 1]):
                node[part] = {}
            else:
                keys = list(node) if isinstance(node, dict) else []
                raise ConfigError(f"override --{dotted_key}: no key {where!r} in the config{nearest_hint(part, keys)}")
        node = node[part]
    leaf = parts[-1]
    if isinstance(node, list):
        if not leaf.isdigit() or int(leaf) >= len(node):
            raise ConfigError(f"override --{dotted_key}: {leaf!r} is not an index of the list")
        node[int(leaf)] = value
    else:
        node[leaf] = value


def parse_override_value(text):
    """Command-line text → YAML scalar (True, 3, [a, b]); numbers like 1e-5 stay text for coerce."""
    if not isinstance(text, str):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# Keys a MindFormers YAML carries that change nothing in a mindsft run (they tune Ascend speed or
# MindFormers' own tooling). They are accepted so a MindFormers file reads unchanged; a run that
# sets one to a non-default value says so in one line (see no_effect_settings).
NO_EFFECT_KEYS = (
    "runner_config.sink_mode", "runner_config.sink_size", "runner_config.initial_epoch",
    "train_dataset.num_parallel_workers", "train_dataset.python_multiprocessing", "train_dataset.numa_enable",
    "train_dataset.prefetch_size", "train_dataset.batch_size", "train_dataset.repeat", "train_dataset.output_columns",
    "eval_dataset.num_parallel_workers", "eval_dataset.python_multiprocessing", "eval_dataset.numa_enable",
    "eval_dataset.prefetch_size", "eval_dataset.batch_size", "eval_dataset.repeat", "eval_dataset.output_columns",
    "parallel_config.vocab_emb_dp", "parallel_config.gradient_aggregation_group", "parallel.gradients_mean",
    "parallel.enable_alltoall", "parallel.full_batch", "parallel.search_mode", "parallel.strategy_ckpt_save_file",
    "recompute_config.select_recompute", "recompute_config.select_comm_recompute",
    "callbacks.checkpoint.integrated_save", "callbacks.checkpoint.async_save",
    "trainer", "train_dataset_task", "eval_dataset_task", "src_strategy_path_or_dir", "auto_trans_ckpt",
    "only_save_strategy", "micro_batch_interleave_num", "metric", "eval_callbacks", "moe_config", "profile",
    "profile_start_step", "profile_stop_step", "init_start_profile", "profile_communication", "profile_memory",
    "layer_scale", "layer_decay", "lr_scale", "lr_scale_factor", "auto_tune", "filepath_prefix", "autotune_per_step",
    "remote_save_url", "register_path", "train_dataset.construct_args_key", "eval_dataset.construct_args_key",
    "processor.tokenizer.model_max_length", "processor.tokenizer.auto_register",
    "parallel.parallel_optimizer_config",
)


def _set_to_non_default(config, dotted):
    """Whether `config`'s value at `a.b.c` differs from that field's default (False when a
    section on the way is absent)."""
    *sections, leaf = dotted.split(".")
    parent = config
    for part in sections:
        parent = getattr(parent, part, None)
    if parent is None or not dataclasses.is_dataclass(parent):
        return False
    field = next(f for f in dataclasses.fields(parent) if f.name == leaf)
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    return getattr(parent, leaf) != default


def no_effect_settings(config):
    """The accepted-but-ignored keys this config sets to something other than their default."""
    changed = [key for key in NO_EFFECT_KEYS if _set_to_non_default(config, key)]
    ignored_model_keys = LlamaConfig.MINDFORMERS_IGNORED_KEYS - {"type"}
    changed += [f"model.model_config.{key}" for key, value in config.model.model_config.items()
                if key in ignored_model_keys and value not in (None, False)]
    return changed


def read_json_config(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: not a readable JSON config ({exc})") from None


def resolve_model_config(config):
    """The model's LlamaConfig: the YAML's model_config over the config that travels with the
    weights (pretrained_model_dir's config.json, or the one beside load_checkpoint). Without
    either, the YAML must give the model's shape: a missing shape is refused, never defaulted."""
    family = family_named(config.model.arch.get("type", "LlamaForCausalLM"), "model.arch.type")
    given = {k: v for k, v in config.model.model_config.items() if k != "pet_config"}
    base_path = (os.path.join(config.pretrained_model_dir, "config.json") if config.pretrained_model_dir
                 else find_model_config(config.load_checkpoint))
    if config.pretrained_model_dir and not os.path.isfile(base_path):
        raise ConfigError(f"pretrained_model_dir {config.pretrained_model_dir}: no config.json in it")
    if base_path:
        base = model_config_from_hf(read_json_config(base_path), base_path)
        merged = {**dataclasses.asdict(base), **given}
        if ("hidden_size" in given or "num_heads" in given) and "head_dim" not in given:
            merged["head_dim"] = None   # derived in the base from what the YAML changes
        return LlamaConfig.from_mindformers(merged, "model.model_config")
    missing = [key for key in SHAPE_KEYS if given.get(key) is None]
    if missing:
        raise ConfigError(f"model.model_config gives no {', '.join(missing)}, and no model config travels with "
                          f"load_checkpoint {config.load_checkpoint or '(none)'}: give them in the YAML, or start "
                          "from a checkpoint written by tools/convert_weight.py (it writes X.config.json beside "
                          "X.ckpt) or from pretrained_model_dir")
    return LlamaConfig.from_mindformers({**family.model_flags, **given, "family": family.name}, "model.model_config")


def resolve_lora(config):
    """The LoRA settings, from MindFormers' pet_config or LLaMA-Factory's keys; None without LoRA."""
    if not config.pet_config and config.finetuning_type != "lora":
        return None
    if config.finetuning_type not in ("full", "lora"):
        raise ConfigError(f"finetuning_type {config.finetuning_type!r} is not one of full, lora")
    if config.pet_config:
        return LoraConfig.from_mindformers(config.pet_config)
    return LoraConfig.from_llamafactory({k: getattr(config, k) for k in
                                         ("lora_rank", "lora_alpha", "lora_dropout", "lora_target")
                                         if getattr(config, k) is not None}, family_of(config.model_config))


def build_run_config(raw):
    """Typed RunConfig from a raw mapping (YAML contents with overrides applied), validated,
    with its model, LoRA and generation parts built once."""
    raw = copy.deepcopy(raw or {})
    callbacks = fold_callbacks(raw.pop("callbacks", None)) if "callbacks" in raw else CallbacksConfig()
    generation = GenerationConfig.from_mapping(raw.pop("generation_config", None) or {}, "generation_config")
    config = build(RunConfig, raw, "")
    config.callbacks = callbacks
    config.generation_config = generation
    validate(config)
    config.model_config = resolve_model_config(config)
    config.lora = resolve_lora(config)
    config.no_effect = no_effect_settings(config)
    config.notes = cpu_precision_notes(config)
    return config


def cpu_precision_notes(config):
    """On CPU, half-precision compute_dtype/param_init_type/embedding_init_type become float32
    (MindSpore's CPU kernels lack bfloat16 for several ops the model uses): one line saying so."""
    if config.context.device_target != "CPU":
        return []
    model = config.model_config
    embedding = config.model.model_config.get("embedding_init_type")
    halves = [f"{key} {value}" for key, value in (("compute_dtype", model.compute_dtype),
                                                  ("param_init_type", model.param_init_type),
                                                  ("embedding_init_type", embedding))
              if value is not None and str(value).lower() not in ("float32", "fp32")]
    if not halves:
        return []
    model.compute_dtype = model.param_init_type = "float32"
    return [f"model_config {', '.join(halves)}: computed in float32 on CPU (MindSpore's CPU kernels are "
            "float32); the YAML's dtypes apply on Ascend/GPU"]


def validate(config):
    if config.stage not in STAGES:
        raise ConfigError(f"stage {config.stage!r} is not one of {', '.join(STAGES)}"
                          f"{nearest_hint(config.stage, STAGES)}")
    if config.run_mode not in RUN_MODES:
        raise ConfigError(f"run_mode {config.run_mode!r} is not one of {', '.join(RUN_MODES)}"
                          f"{nearest_hint(config.run_mode, RUN_MODES)}")
    if config.optimizer.type not in OPTIMIZERS:
        raise ConfigError(f"optimizer.type {config.optimizer.type!r} is not supported "
                          f"({', '.join(OPTIMIZERS)}){nearest_hint(config.optimizer.type, OPTIMIZERS)}")
    if config.optimizer.betas is not None:
        if len(config.optimizer.betas) != 2:
            raise ConfigError(f"optimizer.betas must be two numbers, got {config.optimizer.betas!r}")
        config.optimizer.beta1, config.optimizer.beta2 = (float(b) for b in config.optimizer.betas)
    if config.lr_schedule.type not in LR_SCHEDULES:
        raise ConfigError(f"lr_schedule.type {config.lr_schedule.type!r} is not one of {', '.join(LR_SCHEDULES)}"
                          f"{nearest_hint(config.lr_schedule.type, LR_SCHEDULES)}")
    for key in ("epochs", "batch_size", "gradient_accumulation_steps"):
        if getattr(config.runner_config, key) < 1:
            raise ConfigError(f"runner_config.{key} must be at least 1, got {getattr(config.runner_config, key)}")
    for key in ("data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num"):
        if getattr(config.parallel_config, key) < 1:
            raise ConfigError(f"parallel_config.{key} must be at least 1, got {getattr(config.parallel_config, key)}")
    for section in ("train_dataset", "eval_dataset"):
        if getattr(config, section).pad_to_multiple_of < 0:
            raise ConfigError(f"{section}.pad_to_multiple_of must be 0 (off) or a positive number of tokens, got "
                              f"{getattr(config, section).pad_to_multiple_of}")
    formats = ("ckpt", "safetensors")
    for key, value in (("load_ckpt_format", config.load_ckpt_format),
                       ("CheckpointMonitor checkpoint_format",
                        config.callbacks.checkpoint.checkpoint_format if config.callbacks.checkpoint else "ckpt")):
        if value not in formats:
            raise ConfigError(f"{key} {value!r} is not one of ckpt, safetensors{nearest_hint(value, formats)}")
    if config.auto_trans_ckpt and config.src_strategy_path_or_dir:
        raise ConfigError(f"auto_trans_ckpt with src_strategy_path_or_dir {config.src_strategy_path_or_dir!r}: "
                          "a checkpoint sharded by a parallel strategy cannot be transformed here; merge it into "
                          "one complete checkpoint first (MindFormers' transform_checkpoint.py) and load that")
    if not isinstance(config.model.model_config, dict):
        raise ConfigError("model.model_config must be a mapping of model settings")
    validate_quantization(config)


def validate_quantization(config):
    if config.quantization_bit is None:
        return
    if config.quantization_bit not in QUANTIZATION_BITS:
        raise ConfigError(f"quantization_bit {config.quantization_bit} is not {' or '.join(map(str, QUANTIZATION_BITS))}")
    if config.quantization_type not in QUANT_TYPES:
        raise ConfigError(f"quantization_type {config.quantization_type!r} is not {' or '.join(QUANT_TYPES)}"
                          f"{nearest_hint(config.quantization_type, QUANT_TYPES)}")
    if config.quantization_method not in QUANTIZATION_METHODS:
        raise ConfigError(f"quantization_method {config.quantization_method!r}: only bitsandbytes' formats are "
                          "supported")
    if not (config.pet_config or config.finetuning_type == "lora"):
        raise ConfigError(f"quantization_bit {config.quantization_bit}: a quantized base is frozen, so only LoRA "
                          "adapters can be trained on it; set finetuning_type: lora (or model.model_config.pet_config)")


def load_yaml(path):
    if not os.path.exists(path):
        raise ConfigError(f"{path}: config file does not exist")
    return read_yaml(path, ConfigError, "run config YAML")


def load_run_config(path, overrides=None):
    """Read a YAML run config and apply `{dotted.key: value}` overrides; returns a RunConfig."""
    raw = load_yaml(path)
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, parse_override_value(value))
    try:
        return build_run_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
