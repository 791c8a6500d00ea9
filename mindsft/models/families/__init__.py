"""The registry of model families: each is one module beside this file (its HF config reader
and writer, weight-shape table and HF ⇄ MindSpore weight map), picked by MindFormers'
`model.arch.type`, by HuggingFace's `architectures`/`model_type`, or by name.

Adding a family is adding its module and a line in FAMILIES, then its parity test.
"""
from mindsft.errors import ConfigError
from mindsft.models.families import baichuan2, llama, mistral, qwen2, qwen3

FAMILIES = {family.name: family for family in (llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, mistral.FAMILY,
                                               baichuan2.FAMILY)}


def family_named(name):
    """The family for `name`: ours or a MindFormers model name (`convert_weight.py --model`)."""
    key = str(name).lower()
    for family in FAMILIES.values():
        if key == family.name or key in family.mindformers_names:
            return family
    known = sorted({n for f in FAMILIES.values() for n in (f.name,) + f.mindformers_names})
    raise ConfigError(f"model family {name!r} is not supported (known: {', '.join(known)})")


def family_of_arch(arch_type):
    """The family of MindFormers' `model.arch.type` (e.g. LlamaForCausalLM)."""
    for family in FAMILIES.values():
        if arch_type in family.arch_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.arch_types)
    raise ConfigError(f"model.arch.type {arch_type!r} is not supported (known: {', '.join(known)})")


def family_of_hf_config(hf_config, source="config.json"):
    """The family of a HuggingFace config mapping, from `architectures`, else `model_type`."""
    if not isinstance(hf_config, dict):
        raise ConfigError(f"{source}: expected a JSON object of settings")
    archs = hf_config.get("architectures") or []
    if not isinstance(archs, list):
        raise ConfigError(f"{source}: architectures must be a list of class names, got {archs!r}")
    model_type = hf_config.get("model_type")
    for family in FAMILIES.values():
        if set(archs) & set(family.hf_architectures) or (not archs and model_type in family.hf_model_types):
            return family
    if not archs and model_type is None:
        return FAMILIES["llama"]    # old Llama configs name neither
    known = sorted(a for f in FAMILIES.values() for a in f.hf_architectures if a.endswith("ForCausalLM"))
    raise ConfigError(f"{source}: model_type {model_type!r} / architectures {archs} is not a Llama-family model "
                      f"mindsft supports (known: {', '.join(known)})")


def config_from_hf(hf_config, source="config.json"):
    """(family, LlamaConfig) of a HuggingFace config mapping."""
    family = family_of_hf_config(hf_config, source)
    return family, family.config_from_hf(hf_config, source)


def family_of(config):
    """The family a LlamaConfig belongs to."""
    return family_named(config.family)


def model_config_from_hf(hf_config, source="config.json"):
    """The LlamaConfig of a HuggingFace config mapping, whatever its family."""
    return config_from_hf(hf_config, source)[1]


def hf_config_of(model_config, dtype=None):
    """The HuggingFace `config.json` mapping of a LlamaConfig, in its family's layout."""
    return family_of(model_config).config_to_hf(model_config, dtype)


def hf_to_ms_arrays(hf_arrays, model_config):
    """{our parameter name: array} from whole HuggingFace arrays (tests and small models)."""
    return family_of(model_config).hf_to_ms_arrays(hf_arrays, model_config)


def ms_to_hf_arrays(ms_arrays, model_config):
    """{HuggingFace name: array} from whole arrays of our parameters (tests and small models)."""
    return family_of(model_config).ms_to_hf_arrays(ms_arrays, model_config)
