"""QLoRA's base: a Llama whose linear layers are quantized (4-bit NF4/FP4 or 8-bit LLM.int8, as
bitsandbytes stores them) while their weights stream from a `.ckpt` or a HuggingFace folder.

The model is first built without memory for its parameters (MindSpore's no_init_parameters);
then each tensor is read alone, in float32, quantized if it is a linear weight, and put in place.
Peak memory is the quantized model plus one float32 tensor: the full-precision model never
exists. The output head stays in full precision, as transformers keeps `lm_head` out of
bitsandbytes' quantization; embeddings and norms are not linear layers.
"""
import mindspore as ms
from mindspore import Tensor
from mindspore.nn.utils import no_init_parameters

from mindsft import quant
from mindsft.errors import ConfigError, ConvertError
from mindsft.lora import packs_of, put_cell
from mindsft.models.families.base import check_weights
from mindsft.models.llama import DTYPES, Linear, LlamaForCausalLM
from mindsft.models.quant_linear import Linear4bit, quantized_linear
from mindsft.quant import Quantization
from mindsft.weights import float32, open_base_weights, weights_location

KEPT_IN_FULL_PRECISION = ("lm_head",)


def _megabytes(nbytes):
    return f"{nbytes / 2**20:,.1f} MB"


def build_quantized_llama(llama_config, weights_path, quantization):
    """(LlamaForCausalLM with quantized linear layers and its weights loaded, report line)."""
    tensors, _, _ = open_base_weights(weights_path)
    with no_init_parameters():
        # Layers inlined: with quantized layers the reused layer graph computed wrong adapter
        # gradients on packed rows (tests/test_qlora.py's packed test).
        model = LlamaForCausalLM(llama_config, reuse_layers=False)
    params = {p.name: p for p in model.get_parameters()}
    check_weights({name: tuple(p.shape) for name, p in params.items()},
                  {name: tuple(t.shape) for name, t in tensors.items() if name in params}, weights_path, llama_config)

    param_dtype = DTYPES[llama_config.param_init_type]
    compute_dtype = DTYPES[llama_config.compute_dtype]
    itemsize = 4 if param_dtype == ms.float32 else 2
    linear_cells = {f"{name}.weight": (name, cell) for name, cell in model.cells_and_names()
                    if isinstance(cell, Linear) and name.split(".")[-1] not in KEPT_IN_FULL_PRECISION}
    stacked = _stacked_parts(model) if quantization.bits == 4 else {}
    waiting = {}
    before = after = linear_before = linear_after = 0

    def put(name, cell):
        nonlocal after, linear_after
        cell_name, linear = linear_cells[name]
        if linear.has_bias:
            cell.keep_bias(linear.bias)   # the Parameter itself: its values are read in turn below
        put_cell(model, cell_name, cell)
        linear_after += cell.quantized_bytes()
        after += cell.quantized_bytes()

    for name, param in params.items():
        values = float32(tensors[name])
        before += values.size * itemsize
        if name in stacked:
            linear_before += values.size * itemsize
            if values.size % quant.BLOCK_SIZE:
                raise ConvertError(f"{weights_path}: {name} {values.shape} is one part of a stacked tensor and "
                                   f"not a whole number of {quant.BLOCK_SIZE}-value blocks: bitsandbytes' blocks "
                                   "of the stacked tensor would straddle two parts")
            group = stacked[name]
            waiting[name] = quant.quantize_4bit(values, quantization.quant_type, double_quant=False)
            if all(part in waiting for part in group):
                parts = [waiting.pop(part) for part in group]
                if quantization.double_quant:
                    parts = quant.double_quantize_stacked(parts)
                for part_name, part in zip(group, parts):
                    put(part_name, Linear4bit(part, compute_dtype))
        elif name in linear_cells:
            put(name, quantized_linear(values, quantization.bits, quantization.quant_type, quantization.double_quant,
                                       compute_dtype))
            linear_before += values.size * itemsize
        else:
            param.set_data(Tensor(values).astype(param_dtype))
            after += values.size * itemsize
        del values
    unset = [p.name for p in model.get_parameters() if p.has_init]
    if unset:
        raise ConvertError(f"{weights_path}: no values for {', '.join(unset)}")
    model.quantization = quantization
    report = (f"QLoRA base ({quantization.describe()}): {_megabytes(before)} -> {_megabytes(after)} "
              f"(linear layers {_megabytes(linear_before)} -> {_megabytes(linear_after)}); read from {weights_path}")
    return model, report


def _stacked_parts(model):
    """{weight name: the weight names of its stacked tensor, in order} for the parts of a tensor the
    family's files hold stacked (Baichuan's W_pack = wq, wk, wv). bitsandbytes quantizes the
    stacked tensor: its 64-blocks run along the flattened [q; k; v], so each part's blocks are
    its own (when it is a whole number of blocks), but double quantization's offset and 256-blocks
    span the parts: the parts are double-quantized together (quant.double_quantize_stacked)."""
    stacked = {}
    for members in packs_of(model).values():
        names = tuple(f"{member}.weight" for member in members)
        stacked.update({name: names for name in names})
    return stacked


def build_quantized_base(config):
    """The run's quantized base model (`quantization_bit` set), its weights already loaded."""
    quantization = Quantization(config.quantization_bit, config.quantization_type, config.double_quantization)
    load_checkpoint = config.load_checkpoint or config.pretrained_model_dir
    if not load_checkpoint:
        raise ConfigError("quantization_bit: the quantized base is read from load_checkpoint (a .ckpt or a "
                          "HuggingFace folder); give --load_checkpoint")
    model, report = build_quantized_llama(config.model_config, weights_location(load_checkpoint), quantization)
    print(report)
    return model


def is_quantized(model):
    return getattr(model, "quantization", None) is not None
