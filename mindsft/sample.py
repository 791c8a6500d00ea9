"""The built-in sample: a tiny random Llama in HuggingFace format and a tokenizer trained on the
shipped instruction set, so the demo and the tests run on a fresh machine with no model hub.

Only numpy, safetensors and sentencepiece are used: neither torch nor transformers is needed.
"""
import io
import json
import os

import numpy as np
import sentencepiece as spm
from safetensors.numpy import save_file

from mindsft.convert.names import expected_ms_names, ms_to_hf_name
from mindsft.files import atomic_output
from mindsft.models.llama import LlamaConfig

SAMPLE_DATA_DIR = os.path.join(os.path.dirname(__file__), "sample_data")
SAMPLE_ALPACA = os.path.join(SAMPLE_DATA_DIR, "alpaca_sample.json")

TINY_CONFIG = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2,
                   intermediate_size=128, max_position_embeddings=512, seq_length=256, rms_norm_eps=1e-5)


def sample_texts(path=SAMPLE_ALPACA):
    """The sample's records as the default template renders them, so the tokenizer trained on them
    also knows the prompt wrapper (else the wrapper falls back to bytes and records run long)."""
    from mindsft.templates import alpaca_prompt, get_template

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


def random_llama_arrays(config, seed=0, dtype=np.float32):
    """{HuggingFace name: array} of a randomly initialised Llama (norm weights near 1)."""
    rng = np.random.default_rng(seed)
    shapes = {
        "embedding_weight": (config.vocab_size, config.hidden_size),
        "wq": (config.num_heads * config.head_dim, config.hidden_size),
        "wk": (config.n_kv_heads * config.head_dim, config.hidden_size),
        "wv": (config.n_kv_heads * config.head_dim, config.hidden_size),
        "wo": (config.hidden_size, config.num_heads * config.head_dim),
        "w1": (config.intermediate_size, config.hidden_size),
        "w3": (config.intermediate_size, config.hidden_size),
        "w2": (config.hidden_size, config.intermediate_size),
        "lm_head": (config.vocab_size, config.hidden_size),
    }
    arrays = {}
    for ms_name in expected_ms_names(config.num_layers, config.tie_word_embeddings):
        if "norm" in ms_name:
            value = 1.0 + 0.1 * rng.standard_normal(config.hidden_size)
        else:
            parts = ms_name.split(".")
            key = parts[-2] if parts[-1] == "weight" else parts[-1]
            value = config.initializer_range * rng.standard_normal(shapes[key])
        arrays[ms_to_hf_name(ms_name)] = value.astype(dtype)
    return arrays


def write_tiny_hf_llama(output_dir, seed=0, tokenizer_texts=None, **config_overrides):
    """Write a random Llama as a HuggingFace folder (config.json, model.safetensors,
    generation_config.json, tokenizer.model). Returns the LlamaConfig."""
    config = LlamaConfig(**{**TINY_CONFIG, **config_overrides})
    with atomic_output(output_dir) as tmp:
        os.makedirs(tmp)
        save_file(random_llama_arrays(config, seed), os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config.to_hf(), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}, f, indent=2)
        train_tokenizer(tokenizer_texts or sample_texts(), os.path.join(tmp, "tokenizer.model"),
                        vocab_size=config.vocab_size)
    return config
