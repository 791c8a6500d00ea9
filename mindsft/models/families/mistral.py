"""Mistral: HuggingFace `MistralForCausalLM` ⇄ MindFormers' names.

Llama's layout and names; `sliding_window` (null from v0.2 on) limits attention to that many
slots, which the network honours in its masks, training and decoding alike.
"""
from mindsft.models.families import llama
from mindsft.models.families.base import Family
from mindsft.typed import coerce


def config_from_hf(hf_config, source="config.json"):
    window = hf_config.get("sliding_window") if isinstance(hf_config, dict) else None
    window = None if window is None else coerce(window, int, f"{source}: sliding_window")
    return llama.llama_config_from_hf(hf_config, source, family="mistral", sliding_window=window)


def config_to_hf(config, dtype=None):
    hf = llama.llama_config_to_hf(config, dtype, architecture="MistralForCausalLM", model_type="mistral")
    for key in ("attention_bias", "mlp_bias"):
        hf.pop(key)
    hf["sliding_window"] = config.sliding_window
    return hf


FAMILY = Family(
    name="mistral",
    mindformers_names=("mistral",),
    arch_types=("MistralForCausalLM",),
    hf_architectures=("MistralForCausalLM", "MistralModel"),
    hf_model_types=("mistral",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    weight_entries=llama.weight_entries,
    hf_ignored=llama.hf_ignored,
    lora_projections=llama.LORA_PROJECTIONS,
)
