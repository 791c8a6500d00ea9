"""The registry of model families: each is one module beside this file (its HF config reader
and writer, weight-shape table and HF ⇄ MindSpore weight map), answering two questions:
which family is this (`family_named`: ours, MindFormers' model name or `model.arch.type`;
`family_of`: a LlamaConfig's), and HuggingFace config ⇄ LlamaConfig (`model_config_from_hf`,
`hf_config_of`).

Adding a family is adding its module and a line in FAMILIES, then its parity test.
"""
from mindsft.errors import ConfigError
from mindsft.models.families import baichuan2, llama, mistral, qwen2, qwen3

FAMILIES = {family.name: family for family in (llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, mistral.FAMILY,
                                               baichuan2.FAMILY)}


def family_named(name, what="model family"):
    """The family for `name`: ours, a MindFormers model name (`convert_weight.py --model`) or
    MindFormers' `model.arch.type` (e.g. Qwen2ForCausalLM); `what` names the setting in the error."""
    for family in FAMILIES.values():
        if str(name).lower() in (family.name,) + family.mindformers_names or name in family.arch_types:
            return family
    known = sorted({n for f in FAMILIES.values() for n in (f.name,) + f.mindformers_names + f.arch_types})
    raise ConfigError(f"{what} {name!r} is not supported (known: {', '.join(known)})")


def family_of(model_config):
    """The family a LlamaConfig belongs to."""
    return family_named(model_config.family)


def model_config_from_hf(hf_config, source="config.json"):
    """The LlamaConfig of a HuggingFace config mapping, read by its family (from `architectures`,
    else `model_type`); `family_of` the result names that family."""
    if not isinstance(hf_config, dict):
        raise ConfigError(f"{source}: expected a JSON object of settings")
    archs = hf_config.get("architectures") or []
    if not isinstance(archs, list):
        raise ConfigError(f"{source}: architectures must be a list of class names, got {archs!r}")
    model_type = hf_config.get("model_type")
    for family in FAMILIES.values():
        if set(archs) & set(family.hf_architectures) or (not archs and model_type in family.hf_model_types):
            return family.config_from_hf(hf_config, source)
    if not archs and model_type is None:
        return FAMILIES["llama"].config_from_hf(hf_config, source)    # old Llama configs name neither
    known = sorted(a for f in FAMILIES.values() for a in f.hf_architectures if a.endswith("ForCausalLM"))
    raise ConfigError(f"{source}: model_type {model_type!r} / architectures {archs} is not a Llama-family model "
                      f"mindsft supports (known: {', '.join(known)})")


def hf_config_of(model_config, dtype=None):
    """The HuggingFace `config.json` mapping of a LlamaConfig, in its family's layout."""
    return family_of(model_config).config_to_hf(model_config, dtype)


def hf_to_ms_arrays(hf_arrays, model_config):
    """{our parameter name: array} from whole HuggingFace arrays (tests and small models)."""
    return family_of(model_config).hf_to_ms_arrays(hf_arrays, model_config)


def ms_to_hf_arrays(ms_arrays, model_config):
    """{HuggingFace name: array} from whole arrays of our parameters (tests and small models)."""
    return family_of(model_config).ms_to_hf_arrays(ms_arrays, model_config)
