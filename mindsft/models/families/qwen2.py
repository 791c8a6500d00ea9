"""Qwen2 and Qwen2.5: HuggingFace `Qwen2ForCausalLM` ⇄ MindFormers' names.

Llama's layout with biases on the q/k/v projections (never on o_proj or the MLP), which travel
as `attention.wq.bias`, ...; the small sizes tie the output head to the embedding.
"""
from mindsft.errors import ConfigError
from mindsft.models.families import llama
from mindsft.models.families.base import Family


def reject_sliding_window(hf_config, source):
    # Qwen's window applies only to the layers from max_window_layers on; no released Qwen2/3
    # model turns it on, and the one network has a single window for every layer.
    if hf_config.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true (a window on some layers only) is not supported; "
                          "set it to false, as every released Qwen model has it")


def config_from_hf(hf_config, source="config.json"):
    if isinstance(hf_config, dict):
        reject_sliding_window(hf_config, source)
    return llama.llama_config_from_hf(hf_config, source, family="qwen2", qkv_has_bias=True)


def config_to_hf(config, dtype=None):
    hf = llama.llama_config_to_hf(config, dtype, architecture="Qwen2ForCausalLM", model_type="qwen2")
    for key in ("attention_bias", "mlp_bias", "head_dim"):
        hf.pop(key)
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_layers)
    return hf


FAMILY = Family(
    name="qwen2",
    mindformers_names=("qwen2", "qwen2_5", "qwen2.5"),
    arch_types=("Qwen2ForCausalLM",),
    hf_architectures=("Qwen2ForCausalLM", "Qwen2Model"),
    hf_model_types=("qwen2",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    weight_entries=llama.weight_entries,
    hf_ignored=llama.hf_ignored,
    lora_projections=llama.LORA_PROJECTIONS,
    model_flags={"qkv_has_bias": True},
)
