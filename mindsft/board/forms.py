"""The page's fields → the command lines (and the run YAML) a person would type for them.

Every function returns argv lists run from the project root; values are passed through as the
person typed them, so a wrong value meets the command line's own check. A training run starts
detached, so before anything is written it is checked here with the functions the run itself
uses (`build_run_config`, `mindrecord_files`, `find_weights_file`): the same one-line errors.
"""
import json
import os
import socket

import yaml

from mindsft.config import build_run_config, parse_override_value
from mindsft.data.schema import dataset_manifest, mindrecord_files
from mindsft.errors import ConfigError, DataError, OutputError
from mindsft.input_files import read_yaml
from mindsft.models.families import family_of, model_config_from_hf
from mindsft.weights import find_model_config, find_weights_file

TRAIN_YAML = "train.yaml"
EVAL_YAML = "eval.yaml"
FINETUNING_TYPES = ("full", "lora", "qlora")
# msrun's console and each worker's log; inside the run's folder so that the run is one folder.
MSRUN_LOG = "msrun_log"


def path_of(value):
    """An absolute path (the command runs from the project root, the person typed it from here)."""
    text = str(value or "").strip()
    return os.path.abspath(os.path.expanduser(text)) if text else ""


def text_of(fields, key, default=""):
    value = fields.get(key, default)
    return default if value is None else str(value).strip()


def model_source(model_path):
    """("pretrained_model_dir" | "load_checkpoint", path) of an HF model folder or a checkpoint."""
    if not model_path:
        raise ConfigError("model: give an HF model folder (with config.json) or a .ckpt")
    if os.path.isdir(model_path) and os.path.isfile(os.path.join(model_path, "config.json")):
        return "pretrained_model_dir", model_path
    if os.path.isfile(model_path) or os.path.isdir(model_path):
        return "load_checkpoint", model_path
    raise ConfigError(f"load_checkpoint {model_path}: no such file or folder")


def model_family(model_path):
    """(family, LlamaConfig, config path) of the model a folder or checkpoint carries, or Nones."""
    config_path = (os.path.join(model_path, "config.json") if os.path.isdir(model_path)
                   and os.path.isfile(os.path.join(model_path, "config.json")) else find_model_config(model_path))
    if not config_path:
        return None, None, None
    with open(config_path, encoding="utf-8") as f:
        try:
            hf_config = json.load(f)
        except ValueError as exc:
            raise ConfigError(f"{config_path}: not a readable JSON config ({exc})") from None
    model_config = model_config_from_hf(hf_config, config_path)
    family = family_of(model_config)
    return family, model_config, config_path


# ---- Prepare -------------------------------------------------------------------------------

def preprocess_command(fields):
    """llama_preprocess.py for the Prepare tab: the data files (mixed by weight when several),
    tokenizer, template, sequence length, packing and validation split."""
    data = [path_of(p) for p in fields.get("data") or [] if str(p).strip()]
    argv = ["python", "tools/llama_preprocess.py", "--dataset_type", "qa", "--input_glob", *data,
            "--model_file", path_of(text_of(fields, "tokenizer") or text_of(fields, "model")),
            "--seq_length", text_of(fields, "seq_length", "2048"),
            "--output_file", path_of(text_of(fields, "output_file"))]
    weights = [str(w).strip() for w in fields.get("mix_weights") or [] if str(w).strip()]
    if weights:
        argv += ["--mix_weights", *weights]
    if text_of(fields, "template"):
        argv += ["--template", text_of(fields, "template")]
    if fields.get("packing"):
        argv.append("--packing")
    if text_of(fields, "val_size") not in ("", "0"):
        argv += ["--val_size", text_of(fields, "val_size")]
    argv.append("--no_progress")
    return argv


# ---- Train ---------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_config(fields, output_dir):
    """The run YAML's contents (MindFormers' schema) for the Train tab's fields."""
    source_key, model_path = model_source(path_of(text_of(fields, "model")))
    family = model_family(model_path)[0]
    finetuning = text_of(fields, "finetuning_type", "lora")
    if finetuning not in FINETUNING_TYPES:
        raise ConfigError(f"finetuning_type {finetuning!r} is not one of {', '.join(FINETUNING_TYPES)}")
    workers = parse_override_value(text_of(fields, "workers", "1"))
    learning_rate = parse_override_value(text_of(fields, "learning_rate", "1e-4"))
    raw = {
        "seed": parse_override_value(text_of(fields, "seed", "0")),
        "output_dir": output_dir,
        "run_mode": "finetune",
        source_key: model_path,
        "use_parallel": workers != 1,
        "runner_config": {"epochs": parse_override_value(text_of(fields, "epochs", "3")),
                          "batch_size": parse_override_value(text_of(fields, "batch_size", "1")),
                          "gradient_accumulation_steps": parse_override_value(
                              text_of(fields, "gradient_accumulation_steps", "1"))},
        "optimizer": {"type": "AdamW", "learning_rate": learning_rate,
                      "weight_decay": parse_override_value(text_of(fields, "weight_decay", "0.0"))},
        "lr_schedule": {"type": text_of(fields, "lr_schedule", "CosineWithWarmUpLR"), "learning_rate": learning_rate,
                        "warmup_ratio": parse_override_value(text_of(fields, "warmup_ratio", "0.0"))},
        "train_dataset": {"data_loader": {"type": "MindDataset",
                                          "dataset_dir": path_of(text_of(fields, "dataset_dir")), "shuffle": True}},
        "runner_wrapper": {"use_clip_grad": True,
                           "max_grad_norm": parse_override_value(text_of(fields, "max_grad_norm", "1.0"))},
        "parallel_config": {"data_parallel": workers},
        "callbacks": [{"type": "MFLossMonitor", "per_print_times": 1},
                      {"type": "CheckpointMonitor", "prefix": family.name if family else "llama",
                       "save_checkpoint_steps": parse_override_value(text_of(fields, "save_checkpoint_steps", "100")),
                       "keep_checkpoint_max": 2}],
        "context": {"mode": 0, "device_target": text_of(fields, "device_target", "CPU")},
        "model": {"arch": {"type": family.arch_types[0] if family else "LlamaForCausalLM"},
                  "model_config": {"seq_length": parse_override_value(text_of(fields, "seq_length", "2048")),
                                   "compute_dtype": "float32", "param_init_type": "float32"}},
    }
    eval_dir = path_of(text_of(fields, "eval_dataset_dir"))
    eval_steps = text_of(fields, "eval_steps")
    if eval_dir or eval_steps:
        raw["do_eval"] = True
        raw["eval_step_interval"] = parse_override_value(eval_steps or "10")
        if eval_dir:
            raw["eval_dataset"] = {"data_loader": {"type": "MindDataset", "dataset_dir": eval_dir, "shuffle": False}}
    if finetuning in ("lora", "qlora"):
        raw.update({"finetuning_type": "lora",
                    "lora_rank": parse_override_value(text_of(fields, "lora_rank", "8")),
                    "lora_alpha": parse_override_value(text_of(fields, "lora_alpha", "16")),
                    "lora_target": text_of(fields, "lora_target", "all")})
    if finetuning == "qlora":
        raw["quantization_bit"] = parse_override_value(text_of(fields, "quantization_bit", "4"))
    tokenizer = path_of(text_of(fields, "tokenizer")) or (model_path if source_key == "pretrained_model_dir" else "")
    if tokenizer:
        raw["processor"] = {"tokenizer": {"vocab_file": tokenizer}}
    return raw


def train_argv(yaml_path, workers, port, log_dir, resume=False):
    """The run's command: run_mindformer.py, under scripts/msrun_launcher.sh for several workers."""
    inner = ["run_mindformer.py", "--config", yaml_path]
    if resume:
        inner += ["--resume_training", "True"]
    if workers == 1:
        return ["python", *inner]
    if any(" " in part for part in inner):
        raise ConfigError(f"{yaml_path}: msrun_launcher.sh splits its command at spaces; pick an output folder "
                          "whose path has none")
    return ["bash", "scripts/msrun_launcher.sh", " ".join(inner + ["--use_parallel", "True"]), str(workers),
            str(port), log_dir, "True", "7200"]


def train_plan(fields, default_output_dir):
    """{output_dir, yaml, yaml_path, argv} for the Train tab; raises the run's own error for a
    wrong field. Nothing is written."""
    output_dir = path_of(text_of(fields, "output_dir")) or default_output_dir
    raw = train_config(fields, output_dir)
    yaml_path = os.path.join(output_dir, TRAIN_YAML)
    try:
        config = build_run_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{yaml_path}: {exc}") from None
    port = int(fields.get("port") or free_port())
    argv = train_argv(yaml_path, config.parallel_config.data_parallel, port, os.path.join(output_dir, MSRUN_LOG))
    return {"output_dir": output_dir, "yaml_path": yaml_path, "yaml": yaml.safe_dump(raw, sort_keys=False),
            "argv": argv, "config": config}


def check_train_inputs(plan, is_board_run):
    """What the run would refuse only after starting: its weights, its data, and an output
    folder that holds other files (a run never writes into someone else's folder)."""
    config = plan["config"]
    if config.load_checkpoint and not config.quantization_bit:
        find_weights_file(config.load_checkpoint, 0, config.load_ckpt_format)
    if not config.train_dataset.data_loader.dataset_dir:
        raise DataError("train_dataset.data_loader.dataset_dir: give the MindRecord folder to train on "
                        "(llama_preprocess.py's output)")
    mindrecord_files(config.train_dataset.data_loader.dataset_dir)
    if config.eval_dataset.data_loader.dataset_dir:
        mindrecord_files(config.eval_dataset.data_loader.dataset_dir)
    output_dir = plan["output_dir"]
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise OutputError(f"output_dir {output_dir} is an existing file; give a new folder")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        if is_board_run(output_dir):
            raise OutputError(f"output_dir {output_dir} holds a run already: resume it from the runs list, "
                              "or give a new folder")
        raise OutputError(f"output_dir {output_dir} holds other files; give a new or empty folder")


# ---- Evaluate ------------------------------------------------------------------------------

def eval_plan(fields):
    """{output_dir, yaml, yaml_path, argv} for run_mode eval of a checkpoint on a dataset."""
    output_dir = path_of(text_of(fields, "output_dir"))
    if not output_dir:
        raise OutputError("output_dir: give a new folder for eval_results.json")
    source_key, model_path = model_source(path_of(text_of(fields, "checkpoint")))
    family = model_family(model_path)[0]
    raw = {"run_mode": "eval", "output_dir": output_dir,
           "runner_config": {"batch_size": parse_override_value(text_of(fields, "batch_size", "2"))},
           "context": {"mode": 0, "device_target": "CPU"},
           "model": {"arch": {"type": family.arch_types[0] if family else "LlamaForCausalLM"},
                     "model_config": {"compute_dtype": "float32", "param_init_type": "float32"}}}
    yaml_path = os.path.join(output_dir, EVAL_YAML)
    argv = ["python", "run_mindformer.py", "--config", yaml_path, "--run_mode", "eval",
            "--eval_dataset_dir", path_of(text_of(fields, "dataset_dir"))]
    argv += ["--load_checkpoint", model_path] if source_key == "load_checkpoint" else ["--pretrained_model_dir", model_path]
    raw[source_key] = model_path
    dataset_dir = path_of(text_of(fields, "dataset_dir"))
    # The records' length is the dataset's, recorded by llama_preprocess; the model must match it.
    recorded_length = (dataset_manifest(dataset_dir) or {}).get("seq_length") if dataset_dir else None
    if recorded_length:
        raw["model"]["model_config"]["seq_length"] = recorded_length
    raw["eval_dataset"] = {"data_loader": {"type": "MindDataset", "dataset_dir": path_of(text_of(fields, "dataset_dir")),
                                           "shuffle": False}}
    try:
        config = build_run_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{yaml_path}: {exc}") from None
    if config.load_checkpoint:
        find_weights_file(config.load_checkpoint, 0)
    if not config.eval_dataset.data_loader.dataset_dir:
        raise DataError("eval_dataset.data_loader.dataset_dir: give the MindRecord folder to evaluate on")
    mindrecord_files(config.eval_dataset.data_loader.dataset_dir)
    if os.path.lexists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise OutputError(f"output_dir {output_dir} is not a new or empty folder; give one for eval_results.json")
    return {"output_dir": output_dir, "yaml_path": yaml_path, "argv": argv,
            "yaml": yaml.safe_dump({k: v for k, v in raw.items() if k not in ("load_checkpoint", "pretrained_model_dir")},
                                   sort_keys=False)}


# ---- Export --------------------------------------------------------------------------------

def export_command(fields):
    """merge_lora.py for a LoRA run (its base and PEFT adapter, to a .ckpt and/or HF folder), or
    convert_weight.py --reversed for full weights (a full run's final checkpoint, or any .ckpt)."""
    run_dir = path_of(text_of(fields, "run_dir"))
    checkpoint = path_of(text_of(fields, "checkpoint"))
    merged = path_of(text_of(fields, "merged_ckpt"))
    hf_output = path_of(text_of(fields, "hf_output"))
    if run_dir:
        yaml_path = os.path.join(run_dir, TRAIN_YAML)
        if not os.path.isfile(yaml_path):
            raise ConfigError(f"{run_dir}: not a board training run (no {TRAIN_YAML} in it)")
        raw = read_yaml(yaml_path, ConfigError, "run config YAML")
        base = raw.get("load_checkpoint") or raw.get("pretrained_model_dir")
        if raw.get("finetuning_type") == "lora":
            adapter = os.path.join(run_dir, "peft_adapter")
            if not os.path.isdir(adapter):
                raise DataError(f"{adapter}: no PEFT adapter (has the run finished?)")
            argv = ["python", "tools/merge_lora.py", "--base", base, "--adapter", adapter, "--no_progress"]
            if merged:
                argv += ["--output", merged]
            if hf_output:
                argv += ["--hf_output", hf_output]
            return argv
        prefix = (raw.get("callbacks") or [{}, {}])[1].get("prefix", "llama")
        checkpoint = os.path.join(run_dir, "checkpoint", f"{prefix}_final.ckpt")
    if not checkpoint:
        raise ConfigError("export: give a training run's folder or a .ckpt to convert")
    argv = ["python", "tools/convert_weight.py", "--reversed", "--input_path", checkpoint, "--output_path", hf_output]
    if text_of(fields, "tokenizer_dir"):
        argv += ["--tokenizer_dir", path_of(text_of(fields, "tokenizer_dir"))]
    return argv
