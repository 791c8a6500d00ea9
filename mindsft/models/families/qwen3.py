"""Qwen3: HuggingFace `Qwen3ForCausalLM` ⇄ MindFormers' names.

Llama's layout with an RMSNorm on every query and key head (`attention.q_norm.weight`,
`attention.k_norm.weight`, [head_dim]) before the rotation, and a head_dim of its own (128 where
hidden/heads is not).
"""
from mindsft.errors import ConfigError
from mindsft.models.families import llama
from mindsft.models.families.base import Family
from mindsft.models.families.qwen2 import reject_sliding_window


def config_from_hf(hf_config, source="config.json"):
    if isinstance(hf_config, dict):
        reject_sliding_window(hf_config, source)
        if hf_config.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true (biases on q/k/v and o_proj) is not supported")
    return llama.llama_config_from_hf(hf_config, source, family="qwen3", qk_norm=True)


def config_to_hf(config, dtype=None):
    hf = llama.llama_config_to_hf(config, dtype, architecture="Qwen3ForCausalLM", model_type="qwen3")
    hf.pop("mlp_bias")
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_layers)
    return hf


FAMILY = Family(
    name="qwen3",
    mindformers_names=("qwen3",),
    arch_types=("Qwen3ForCausalLM",),
    hf_architectures=("Qwen3ForCausalLM", "Qwen3Model"),
    hf_model_types=("qwen3",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    weight_entries=llama.weight_entries,
    hf_ignored=llama.hf_ignored,
    lora_projections=llama.LORA_PROJECTIONS,
    model_flags={"qk_norm": True},
)
