"""Building the network from the run config and putting state into it: weights (a converted or
trained `.ckpt`, or a HuggingFace folder, as `mindsft.weights` finds and opens them), LoRA
adapters, a quantized base (`mindsft.quantized_base`), and a training checkpoint's optimizer
moments and counters — each through the one name/shape check of `families.base.check_weights`.
"""
import os

import numpy as np
import mindspore as ms

from mindsft import lora
from mindsft.convert.hf_reader import find_weights
from mindsft.errors import CheckpointError, ConfigError, ConvertError
from mindsft.models.families.base import check_weights
from mindsft.models.llama import LlamaForCausalLM
from mindsft.quantized_base import build_quantized_base
from mindsft.weights import checkpoint_tensors, find_weights_file, float32, open_base_weights

OPTIMIZER_STATE_PREFIXES = ("adam_m.", "adam_v.", "accum_grad.")
STATE_KEYS = ("global_step", "loss_scale", "good_steps", "epoch_num", "step_num")


def build_model(config):
    """The network of `config.model_config`, with LoRA adapters when `config.lora` asks; with
    quantization_bit, its base is quantized while it loads (QLoRA), so its weights are in already."""
    if config.quantization_bit:
        model = build_quantized_base(config)
    else:
        model = LlamaForCausalLM(config.model_config)
    if config.lora is not None:
        lora.apply_lora(model, config.lora, seed=config.seed)
        print(lora.parameter_report(model)[2])
    return model


def uses_lora(model):
    return getattr(model, "lora_config", None) is not None


def assign_weights(model, arrays, source="weights", strict=True):
    """Copy {parameter name: array} into `model`'s parameters.

    Every name must be a parameter of the model with the same shape; with `strict`, every
    parameter must be given. One error names the offending tensors and the likely setting.
    """
    params = {p.name: p for p in model.get_parameters()}
    expected = {name: tuple(p.shape) for name, p in params.items()}
    given = {name: tuple(np.shape(value)) for name, value in arrays.items()}
    if not strict:
        expected = {name: shape for name, shape in expected.items() if name in given}
    check_weights(expected, given, source, getattr(model, "config", None))
    for name, value in arrays.items():
        param = params[name]
        value = value if isinstance(value, ms.Tensor) else ms.Tensor(np.asarray(value))
        param.set_data(value.astype(param.dtype))


def model_weights(arrays):
    """The entries of a checkpoint that are model weights (not optimizer state or counters)."""
    return {name: value for name, value in arrays.items()
            if not name.startswith(OPTIMIZER_STATE_PREFIXES) and name not in STATE_KEYS}


def load_checkpoint_arrays(path):
    """{name: array} of a .ckpt file, checksum verified first; a damaged file is named. Arrays
    are numpy, except bfloat16 ones: MindSpore Tensors, which numpy cannot hold without doubling."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: checkpoint file does not exist")
    try:
        return {name: ms.Tensor(stored.to_numpy()).view(ms.bfloat16) if stored.dtype == "bfloat16"
                else stored.to_numpy() for name, stored in checkpoint_tensors(path).items()}
    except CheckpointError:
        raise
    except ConvertError as exc:
        raise CheckpointError(f"not a readable MindSpore checkpoint: {exc}") from None


def load_weights(model, path):
    """Model weights from a .ckpt (a converted model or a training checkpoint: optimizer state
    ignored); LoRA adapters are new parameters the base cannot hold, so they are not required."""
    weights = model_weights(load_checkpoint_arrays(path))
    given = {name: tuple(value.shape) for name, value in weights.items()}
    expected = {p.name: tuple(p.shape) for p in model.get_parameters() if "lora_" not in p.name or p.name in given}
    check_weights(expected, given, path, model.config)
    assign_weights(model, weights, source=path, strict=False)


def load_hf_weights(model, folder):
    """Model weights from a HuggingFace folder (pretrained_model_dir), through its family's map."""
    config = model.config
    weights_path, _ = find_weights(folder)
    tensors = open_base_weights(folder, config)[0]
    arrays = {name: float32(t) for name, t in tensors.items()}
    expected = {p.name: tuple(p.shape) for p in model.get_parameters() if "lora_" not in p.name}
    check_weights(expected, {n: a.shape for n, a in arrays.items()}, weights_path, config)
    assign_weights(model, arrays, source=weights_path, strict=False)


def load_start_weights(model, config, rank=0):
    """The weights a run starts from: load_checkpoint, else pretrained_model_dir's; none is fine
    for pretraining from scratch. A quantized base read them while it was built."""
    if config.quantization_bit:
        return
    if config.load_checkpoint:
        load_weights(model, find_weights_file(config.load_checkpoint, rank, config.load_ckpt_format))
    elif config.pretrained_model_dir:
        load_hf_weights(model, config.pretrained_model_dir)


def restore_training_state(model, optimizer, path):
    """Weights, optimizer moments and counters from a training checkpoint; returns the counters."""
    arrays = load_checkpoint_arrays(path)
    missing = [name for name in optimizer.state() if name not in arrays]
    missing += [key for key in STATE_KEYS if key not in arrays]
    if missing:
        raise ConfigError(f"{path}: not a training checkpoint, it lacks {', '.join(missing[:5])}")
    assign_weights(model, {p.name: arrays[p.name] for p in model.get_parameters() if p.name in arrays},
                   source=path, strict=False)
    for name, param in optimizer.state().items():
        param.set_data(ms.Tensor(arrays[name], ms.float32))
    return {key: np.asarray(arrays[key]).item() for key in STATE_KEYS}
