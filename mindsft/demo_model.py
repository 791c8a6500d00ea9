"""The demo model: a tiny random Llama-family model in HuggingFace format and a tokenizer trained
on the shipped instruction set, so the demo and the tests run on a fresh machine with no model hub.

Only numpy, safetensors and sentencepiece are used: neither torch nor transformers is needed.
"""
import io
import json
import os

import numpy as np
import sentencepiece as spm
from safetensors.numpy import save_file

from mindsft.output_files import atomic_output
from mindsft.models.config import LlamaConfig
from mindsft.models.families import family_named, family_of
from mindsft.templates import alpaca_prompt, get_template

SAMPLE_DATA_DIR = os.path.join(os.path.dirname(__file__), "sample_data")
SAMPLE_ALPACA = os.path.join(SAMPLE_DATA_DIR, "alpaca_sample.json")

TINY_CONFIG = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2,
                   intermediate_size=128, max_position_embeddings=512, seq_length=256, rms_norm_eps=1e-5)
# What makes each family's tiny model that family's (configs/<family>/*_tiny_cpu.yaml say the same):
# Qwen3's head_dim apart from hidden/heads, a Mistral window shorter than seq_length, Baichuan's
# one key/value head per head.
TINY_FAMILY_SETTINGS = {
    "llama": {},
    "llama3": dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(rope_theta=1000000.0, rms_norm_eps=1e-6),
    "qwen3": dict(head_dim=32, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "mistral": dict(sliding_window=128, rope_theta=1000000.0),
    "baichuan2": dict(n_kv_heads=4, rms_norm_eps=1e-6),
}


def sample_texts(path=SAMPLE_ALPACA):
    """The sample's records as the default template renders them, so the tokenizer trained on them
    also knows the prompt wrapper (else the wrapper falls back to bytes and records run long)."""
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    template = get_template("vicuna_v1.1")
    texts = []
    for r in records:
        messages = [{"role": "user", "content": alpaca_prompt(r["instruction"], r.get("input", ""))},
                    {"role": "assistant", "content": r["output"]}]
        texts.append(template.render_prompt(messages[:1]) + " " + r["output"])
    return texts


def train_tokenizer(texts, output_path, vocab_size=512):
    """Train a Llama-style SentencePiece model (unk 0, bos 1, eos 2, no pad, byte fallback)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        split_digits=True, hard_vocab_limit=False, minloglevel=2)
    with atomic_output(output_path) as tmp:
        with open(tmp, "wb") as f:
            f.write(model.getvalue())
    return output_path


# The byte-level BPE `tokenizer.json` a family ships (Llama 3, Qwen, Mistral v0.3; Llama 2 and
# Baichuan2 ship SentencePiece): its special tokens, ordered so that pad/unk is 0, the BOS 1 and
# the end token 2 as in the tiny configs (Qwen has no BOS: 1 is <|im_start|>, never prepended),
# and whether the post-processor puts the BOS before a text.
BPE_SPECIAL_TOKENS = {
    "llama3": (["<|finetune_right_pad_id|>", "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>",
                "<|start_header_id|>", "<|end_header_id|>"], True),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], False),
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"], False),
    "mistral": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], True),
}


def train_bpe_tokenizer(texts, folder, family, vocab_size=512):
    """Train a byte-level BPE with `family`'s special tokens and write `tokenizer.json` and
    `tokenizer_config.json` into `folder` (an HF tokenizer folder, as Llama 3's and Qwen's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    specials, adds_bos = BPE_SPECIAL_TOKENS[family]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    if adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{specials[1]} $A", pair=f"{specials[1]} $A {specials[1]} $B", special_tokens=[(specials[1], 1)])
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[1] if adds_bos else None,
              "eos_token": specials[2], "pad_token": specials[0], "clean_up_tokenization_spaces": False}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    return folder


def random_llama_arrays(config, seed=0, dtype=np.float32):
    """{HuggingFace name: array} of a randomly initialised model of `config`'s family (norm weights near 1)."""
    rng = np.random.default_rng(seed)
    family = family_of(config)
    arrays = {}
    for name, shape in family.weight_shapes(config).items():
        if name.endswith(".bias"):
            value = 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            value = config.initializer_range * rng.standard_normal(shape)
        arrays[name] = value.astype(dtype)
    return family.ms_to_hf_arrays(arrays, config)


def tiny_config(family="llama", **config_overrides):
    """The LlamaConfig of the tiny demo model of `family` (a registry name or MindFormers' name)."""
    settings = TINY_FAMILY_SETTINGS.get(str(family).lower())
    family = family_named(family)
    settings = TINY_FAMILY_SETTINGS.get(family.name, {}) if settings is None else settings
    return LlamaConfig(**{**family.model_flags, **TINY_CONFIG, **settings,
                          **config_overrides, "family": family.name})


def write_tiny_hf_llama(output_dir, seed=0, tokenizer_texts=None, family="llama", **config_overrides):
    """Write a random model of `family` (llama, qwen2, qwen3, mistral, baichuan2) as a HuggingFace
    folder (config.json, model.safetensors, generation_config.json, and the family's kind of
    tokenizer: a byte-level BPE tokenizer.json for Llama 3, Qwen and Mistral, else a SentencePiece
    tokenizer.model). Returns the LlamaConfig."""
    config = tiny_config(family, **config_overrides)
    with atomic_output(output_dir, folder=True, overwrite=True) as tmp:
        os.makedirs(tmp)
        save_file(random_llama_arrays(config, seed), os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(family_of(config).config_to_hf(config), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}, f, indent=2)
        if str(family).lower() in BPE_SPECIAL_TOKENS:
            train_bpe_tokenizer(tokenizer_texts or sample_texts(), tmp, str(family).lower(), config.vocab_size)
        else:
            train_tokenizer(tokenizer_texts or sample_texts(), os.path.join(tmp, "tokenizer.model"),
                            vocab_size=config.vocab_size)
    return config
