"""LoRA on the network: the adapter layer, applying it to the chosen linear cells, loading and
exporting adapter state, and merging adapters back into the base weights in place.

The settings are `mindsft.lora_config.LoraConfig`; adapter files (PEFT folders, the merge of
files on disk) are `mindsft.convert.peft`. The base weight of each adapted cell keeps its exact
name and is frozen.
"""
import contextlib
import math
import re

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from mindsft.convert import peft
from mindsft.errors import ConfigError
from mindsft.lora_config import LORA_A, LORA_B, LoraConfig, is_adapter_name, merged_weight  # noqa: F401
from mindsft.models.families import family_of
from mindsft.models.families.base import check_weights
from mindsft.models.llama import DTYPES, Linear, weight_product
from mindsft.models.quant_linear import QuantizedLinear


class LoraLinear(nn.Cell):
    """y = x·Wᵀ (+ b) + scaling · dropout(x)·Aᵀ·Bᵀ; W (and b) frozen, A and B trained.

    On a packed projection (Baichuan's W_pack = wq, wk, wv) the cells of the pack share one A
    and one stacked B, each using its own `rows` of B: what PEFT's LoRA on W_pack computes, with
    the gradients of the shared A summed over the pack as autodiff sums them. (With dropout, each
    cell draws its own mask where PEFT draws one for the pack.)
    """

    def __init__(self, base, scaling, dropout, lora_a, lora_b, rows=None):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad = False
        self.has_bias = base.has_bias
        if base.has_bias:
            self.bias = base.bias
            self.bias.requires_grad = False
        # A decode step's few rows go through the base's few-rows kernel, as without LoRA.
        self.few_rows = base.few_rows
        self.attach_adapter(base, scaling, dropout, lora_a, lora_b, rows)

    def attach_adapter(self, base, scaling, dropout, lora_a, lora_b, rows):
        """What every LoRA cell holds beside its base: sizes, A and B, the rows of B it uses, dropout."""
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.compute_dtype = base.compute_dtype
        self.scaling = scaling
        self.matmul = ops.MatMul(transpose_b=True)
        self.mindpet_delta_lora_a = lora_a
        self.mindpet_delta_lora_b = lora_b
        self.rows = rows or (0, self.out_features)
        self.packed = rows is not None
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        # False only while a graph is built under `adapters_disabled` (the preference reference).
        self.adapter_enabled = True

    def base_product(self, x):
        """x·Wᵀ (+ b): the frozen base's output (a quantized base computes it itself)."""
        y = weight_product(x, self.weight.astype(self.compute_dtype), self.matmul, self.few_rows)
        if self.has_bias:
            y = y + self.bias.astype(self.compute_dtype)
        return y

    def lora_b_rows(self):
        if self.packed:
            return self.mindpet_delta_lora_b[self.rows[0]:self.rows[1]]
        return self.mindpet_delta_lora_b

    def construct(self, x):
        out_shape = x.shape[:-1] + (self.out_features,)
        x = ops.reshape(x.astype(self.compute_dtype), (-1, self.in_features))
        y = self.base_product(x)
        if not self.adapter_enabled:
            return ops.reshape(y, out_shape)
        low_rank = self.matmul(self.lora_dropout(x), self.mindpet_delta_lora_a.astype(self.compute_dtype))
        y = y + self.matmul(low_rank, self.lora_b_rows().astype(self.compute_dtype)) * self.scaling
        return ops.reshape(y, out_shape)


class LoraQuantizedLinear(LoraLinear):
    """LoRA on a quantized frozen base (QLoRA): the base cell, kept as `base_layer` as PEFT names
    it, dequantizes its own weight; gradients reach A and B through that product."""

    def __init__(self, base, scaling, dropout, lora_a, lora_b, rows=None):
        nn.Cell.__init__(self)  # not LoraLinear's: there is no float weight to hold
        self.base_layer = base
        self.has_bias = False
        self.attach_adapter(base, scaling, dropout, lora_a, lora_b, rows)

    def base_product(self, x):
        return self.base_layer(x)


@contextlib.contextmanager
def adapters_disabled(model):
    """The model as its frozen base (PEFT's `disable_adapter`): a graph compiled or run inside
    computes without the adapters. A graph is built once per cell and shape, so the cell that runs
    the base (the preference reference) is only ever called inside, and the training step outside."""
    cells = [cell for _, cell in model.cells_and_names() if isinstance(cell, LoraLinear)]
    for cell in cells:
        cell.adapter_enabled = False
    try:
        yield model
    finally:
        for cell in cells:
            cell.adapter_enabled = True


def _cell_at(model, dotted):
    cell = model
    for part in dotted.split(".") if dotted else []:
        cell = getattr(cell, part)
    return cell


def put_cell(model, full_name, cell):
    parent_name, _, attr = full_name.rpartition(".")
    setattr(_cell_at(model, parent_name), attr, cell)
    # A cell set after construction is prefixed with its attribute name only.
    cell.update_parameters_name(full_name + ".")
    layer = re.match(r"model\.layers\.\d+", full_name)
    if layer and hasattr(_cell_at(model, layer.group()), "key_by_structure"):
        _cell_at(model, layer.group()).key_by_structure()


def packs_of(model):
    """{full name of a packed module (`model.layers.0.attention.w_qkv`): full names of its cells}."""
    packs = family_of(model.config).lora_packs if hasattr(model, "config") else {}
    found = {}
    for full_name, cell in model.cells_and_names():
        for pack, members in packs.items():
            if all(isinstance(getattr(cell, m, None), (Linear, QuantizedLinear, LoraLinear)) for m in members):
                prefix = full_name + "." if full_name else ""
                found[prefix + pack] = tuple(prefix + m for m in members)
    return found


def hf_projection_of(model, module):
    """PEFT's name (`W_pack`) of our module's projection."""
    local = module.rsplit(".", 1)[-1]
    return next((hf for hf, ours in family_of(model.config).lora_projections.items() if local in ours), local)


def select_lora_modules(model, lora_config):
    """Full names of the linear cells (or packed modules, see `packs_of`) `lora_config` adapts,
    in model order; the cells of a chosen pack are not chosen alone."""
    excluded_prefixes, chosen, linear_names = [], [], []
    packs = packs_of(model)
    packed_cells = {member: pack for pack, members in packs.items() for member in members}

    def wanted(full_name):
        local = full_name.rsplit(".", 1)[-1]
        return (full_name.startswith("model.") and re.match(lora_config.target_modules, local)) or \
            re.fullmatch(lora_config.target_modules, full_name)

    for full_name, cell in model.cells_and_names():
        if not full_name:
            continue
        local = full_name.rsplit(".", 1)[-1]
        if any(re.match(rule, local) for rule in lora_config.exclude_layers):
            excluded_prefixes.append(full_name + ".")
        if isinstance(cell, LoraLinear):
            raise ConfigError(f"LoRA is already applied to {full_name}")
        if not isinstance(cell, (Linear, QuantizedLinear)) or any((full_name + ".").startswith(p) for p in excluded_prefixes):
            continue
        pack = packed_cells.get(full_name)
        if pack is not None and pack not in linear_names:
            linear_names.append(pack)
            if wanted(pack) and not any(re.match(rule, pack.rsplit(".", 1)[-1])
                                        for rule in lora_config.exclude_layers):
                chosen.append(pack)
        linear_names.append(full_name)
        if wanted(full_name) and not (pack is not None and pack in chosen):
            if pack is not None:
                # Its adapters could be neither exported to PEFT nor merged into the HF tensor.
                raise ConfigError(f"LoRA target_modules {lora_config.target_modules!r} adapts {full_name} alone, but "
                                  f"it is one part of the packed projection {pack} (HuggingFace's "
                                  f"{family_of(model.config).hf_module_of(pack)}): target "
                                  f"'.*{pack.rsplit('.', 1)[-1]}' (lora_target: "
                                  f"{hf_projection_of(model, pack)}) instead")
            chosen.append(full_name)
    if not chosen:
        examples = ", ".join(linear_names[:8])
        raise ConfigError(f"LoRA target_modules {lora_config.target_modules!r} matches no linear layer "
                          f"(they are named like {examples})")
    return chosen


def apply_lora(model, lora_config, seed=0):
    """Replace the chosen Linear cells of `model` by LoraLinear cells in place; freeze the rest.

    A is drawn as PEFT draws it (kaiming-uniform with a=√5, i.e. U(±1/√in)) from `seed`; B is zero,
    so the adapted model starts equal to the base. Returns the full names of the adapted cells.
    """
    chosen = select_lora_modules(model, lora_config)
    packs = packs_of(model)
    rng = np.random.default_rng(seed)
    param_dtype = DTYPES[model.config.param_init_type]
    for param in model.get_parameters():
        param.requires_grad = False
    for full_name in chosen:
        bases = [_cell_at(model, member) for member in packs.get(full_name, (full_name,))]
        in_features, out_features = bases[0].in_features, sum(base.out_features for base in bases)
        bound = 1.0 / math.sqrt(in_features)
        lora_a = Parameter(Tensor(rng.uniform(-bound, bound, (lora_config.rank, in_features)).astype(np.float32),
                                  param_dtype), name=f"{full_name}.{LORA_A}")
        lora_b = Parameter(Tensor(np.zeros((out_features, lora_config.rank), np.float32), param_dtype),
                           name=f"{full_name}.{LORA_B}")
        start = 0
        for member, base in zip(packs.get(full_name, (full_name,)), bases):
            rows = (start, start + base.out_features) if full_name in packs else None
            wrapper = LoraQuantizedLinear if isinstance(base, QuantizedLinear) else LoraLinear
            put_cell(model, member, wrapper(base, lora_config.scaling, lora_config.dropout, lora_a, lora_b, rows))
            start += base.out_features
        # Named last: putting each cell of a pack renamed the shared A and B after that cell.
        lora_a.name, lora_b.name = f"{full_name}.{LORA_A}", f"{full_name}.{LORA_B}"
    model.lora_config = lora_config
    return chosen


def lora_modules(model):
    """{full cell name: LoraLinear} of a model with LoRA applied."""
    return {name: cell for name, cell in model.cells_and_names() if isinstance(cell, LoraLinear)}


def adapter_state(model):
    """{name: Parameter} of the adapter weights only: what a LoRA checkpoint holds."""
    return {p.name: p for p in model.get_parameters() if is_adapter_name(p.name)}


def load_adapter_state(model, arrays, source="adapter checkpoint"):
    """Copy {adapter name: array} into a model with LoRA applied; names and shapes must match exactly.

    Entries that are not adapter weights (optimizer state, step counters) are ignored.
    """
    params = adapter_state(model)
    given = {k: v for k, v in arrays.items() if is_adapter_name(k)}
    check_weights({k: tuple(p.shape) for k, p in params.items()}, {k: tuple(np.shape(v)) for k, v in given.items()},
                  source, phrases=("adapters missing", "adapters the model does not have", "shapes that disagree"))
    for name, value in given.items():
        value = value if isinstance(value, Tensor) else Tensor(np.asarray(value))
        params[name].set_data(value.astype(params[name].dtype))


def merge_lora(model):
    """Fold every adapter into its base weight in place; the model is a plain Llama again."""
    if any(isinstance(cell, LoraQuantizedLinear) for cell in lora_modules(model).values()):
        raise ConfigError("merge_lora: the base is quantized; merge the adapters into the full-precision base "
                          "with tools/merge_lora.py")
    for full_name, cell in lora_modules(model).items():
        lora_b = cell.mindpet_delta_lora_b.asnumpy()[cell.rows[0]:cell.rows[1]]
        weight = merged_weight(cell.weight.asnumpy(), cell.mindpet_delta_lora_a.asnumpy(), lora_b, cell.scaling)
        plain = Linear(cell.in_features, cell.out_features, model.config, has_bias=cell.has_bias)
        plain.weight = Parameter(Tensor(weight), name="weight", requires_grad=True)
        if cell.has_bias:
            plain.bias = Parameter(cell.bias.data, name="bias", requires_grad=True)
        put_cell(model, full_name, plain)
    for param in model.get_parameters():
        param.requires_grad = True
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def parameter_report(model):
    """(trainable count, total count, line) — the line as PEFT's print_trainable_parameters writes it."""
    trainable = sum(int(np.prod(p.shape)) for p in model.trainable_params())
    total = sum(int(np.prod(p.shape)) for p in model.get_parameters())
    line = (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100.0 * trainable / max(total, 1):.4f}")
    return trainable, total, line


# ---- PEFT: the adapter state of a model as files ----------------------------------------------------

def adapter_arrays(model):
    """{our adapter name: float array} of a model with LoRA applied."""
    return {name: param.asnumpy() for name, param in adapter_state(model).items()}


def save_peft_adapter(model, output_dir, base_model_name_or_path=None):
    """Write `adapter_model.safetensors` + `adapter_config.json` that `PeftModel.from_pretrained` loads."""
    lora_config = getattr(model, "lora_config", None)
    if lora_config is None:
        raise ConfigError("save_peft_adapter: the model has no LoRA applied")
    return peft.write_peft_adapter(output_dir, lora_config, adapter_arrays(model), family_of(model.config),
                                   base_model_name_or_path)


def load_peft_adapter(model, adapter_dir, seed=0):
    """Apply LoRA to `model` as a PEFT adapter folder describes and load its weights; returns its LoraConfig."""
    lora_config, arrays = peft.read_peft_adapter(adapter_dir, family_of(model.config))
    apply_lora(model, lora_config, seed)
    load_adapter_state(model, arrays, source=f"{adapter_dir}/{peft.PEFT_WEIGHTS}")
    return lora_config
