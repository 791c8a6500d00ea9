"""The same random model of each family in transformers (the reference) and in mindsft.

Baichuan's modeling code is not part of transformers: its reference is transformers'
`LlamaForCausalLM` holding the same weights with `W_pack` split into q/k/v and an output head
that normalises its rows in the forward pass, as Baichuan2's NormHead does.
"""
import json
import os

import numpy as np
import torch
import transformers

from mindsft.loading import assign_weights
from mindsft.models.families import hf_to_ms_arrays, model_config_from_hf
from mindsft.models.llama import LlamaForCausalLM

# Tiny, odd sizes, grouped key/value heads (Baichuan has none: one key/value head per head).
# Head sizes: 32 for some (the fused CPU attention), 12/20 for others (MindSpore's ops).
SIZES = dict(vocab_size=101, hidden_size=48, intermediate_size=53, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
FAMILIES = {
    "llama3": (transformers.LlamaForCausalLM, transformers.LlamaConfig, dict(
        hidden_size=64, num_attention_heads=2, num_key_value_heads=1, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, dict(rope_theta=1000000.0)),
    "qwen2_tied": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config, dict(head_dim=32)),
    "qwen3_head_dim_20": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config, dict(head_dim=20)),
    "mistral_window_7": (transformers.MistralForCausalLM, transformers.MistralConfig, dict(sliding_window=7)),
    "baichuan2": (None, None, dict(num_key_value_heads=4)),
}


class TorchNormHead(torch.nn.Module):
    """Baichuan2's NormHead as its modeling code computes it in training."""

    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, hidden):
        return torch.nn.functional.linear(hidden, torch.nn.functional.normalize(self.weight))


def baichuan2_config_json(hf_config):
    return {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan",
            "vocab_size": hf_config.vocab_size, "hidden_size": hf_config.hidden_size,
            "intermediate_size": hf_config.intermediate_size, "num_hidden_layers": hf_config.num_hidden_layers,
            "num_attention_heads": hf_config.num_attention_heads, "hidden_act": "silu",
            "max_position_embeddings": hf_config.max_position_embeddings, "model_max_length": 128,
            "rms_norm_eps": hf_config.rms_norm_eps, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "tie_word_embeddings": False, "torch_dtype": "float32", "z_loss_weight": 0}


def baichuan2_files(reference):
    """{Baichuan HF name: array} of the reference: W_pack stacked, the head's raw rows."""
    state = {k: v.detach().float().numpy() for k, v in reference.state_dict().items()}
    out = {}
    for name, value in state.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        if ".self_attn.q_proj." in name:
            prefix = name.split(".self_attn.")[0]
            value = np.concatenate([state[f"{prefix}.self_attn.{p}_proj.weight"] for p in "qkv"], 0)
            name = f"{prefix}.self_attn.W_pack.weight"
        out[name] = value
    return out


def reference_model(family, seed=0, scale=1.0, **overrides):
    """A random reference model of `family` (a key of FAMILIES), norms and biases perturbed."""
    cls, config_cls, settings = FAMILIES[family]
    torch.manual_seed(seed)
    hf_config = (config_cls or transformers.LlamaConfig)(**{**SIZES, **settings, **overrides})
    model = (cls or transformers.LlamaForCausalLM)(hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name:
                param.add_(0.1 * torch.randn_like(param))
            elif scale != 1.0:
                param.mul_(scale)
        if cls is None:
            # Rows of different lengths, so that normalising them matters.
            raw = model.lm_head.weight * (0.5 + torch.rand(hf_config.vocab_size, 1))
            model.lm_head = TorchNormHead(raw.detach().clone())
    return model


def hf_files(family, reference):
    """(config.json mapping, {HF name: array}) of the reference as its family stores it."""
    if FAMILIES[family][0] is None:
        return baichuan2_config_json(reference.config), baichuan2_files(reference)
    arrays = {k: v.detach().float().numpy() for k, v in reference.state_dict().items()}
    if reference.config.tie_word_embeddings:
        arrays.pop("lm_head.weight")   # the state dict repeats the embedding; the files do not
    return reference.config.to_dict(), arrays


def twin(family, reference):
    """Our LlamaForCausalLM built from the reference's files through the family's map."""
    config_json, arrays = hf_files(family, reference)
    config = model_config_from_hf(config_json)
    model = LlamaForCausalLM(config)
    ours = hf_to_ms_arrays(arrays, config)
    if config.tie_word_embeddings:
        ours.pop("lm_head.weight", None)
    assign_weights(model, ours, source="reference state_dict")
    return model


def reference_arrays_as_ours(reference, config):
    """{our name: array} of any reference tensor set (its q/k/v split, as in Llama's map)."""
    from mindsft.models.families import FAMILIES as REGISTRY
    family = REGISTRY["llama"] if REGISTRY[config.family].lora_packs else REGISTRY[config.family]
    return family.hf_to_ms_arrays(reference, config)


def write_family_folder(family, reference, folder):
    """The reference as its family's HF folder (config.json, model.safetensors); returns its arrays."""
    from safetensors.numpy import save_file
    config_json, arrays = hf_files(family, reference)
    os.makedirs(folder)
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config_json, f)
    return arrays
