"""Predict with a tokenizer.json: Llama 3's template as transformers renders it, replies equal to
transformers' greedy generate stopping at the same end tokens."""
import json

import mindspore as ms
import pytest
import torch
import transformers

from mindsft.convert.convert import hf_to_ms
from mindsft.loading import assign_weights
from mindsft.models.families import model_config_from_hf
from mindsft.models.llama import LlamaForCausalLM
from mindsft.predict import generation_settings, run_predict
from mindsft.demo_model import write_tiny_hf_llama
from mindsft.templates import get_template
from mindsft.tokenizer import load_tokenizer
from tokenizer_helpers import write_bpe_tokenizer


@pytest.fixture(scope="module")
def model_with_bpe(tmp_path_factory):
    """A tiny HF Llama (vocab 512) whose folder holds a byte-level BPE tokenizer.json of 512 tokens."""
    root = tmp_path_factory.mktemp("predict_bpe")
    hf_dir = root / "hf"
    write_tiny_hf_llama(hf_dir, seed=3, initializer_range=0.25)
    (hf_dir / "tokenizer.model").unlink()
    write_bpe_tokenizer(hf_dir, vocab_size=512)
    ckpt = root / "model.ckpt"
    hf_to_ms(str(hf_dir), str(ckpt), progress=False)
    with open(hf_dir / "config.json") as f:
        model = LlamaForCausalLM(model_config_from_hf(json.load(f)))
    assign_weights(model, {n: p.asnumpy() for n, p in ms.load_checkpoint(str(ckpt)).items()}, source=str(ckpt))
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return model, hf_dir, hf


def test_llama3_replies_equal_transformers_greedy_with_a_tokenizer_json(model_with_bpe):
    model, hf_dir, hf = model_with_bpe
    tokenizer = load_tokenizer(hf_dir)
    assert tokenizer.vocab_size <= model.config.vocab_size
    reference = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    questions = ["What is the capital of France?", "Give three tips for staying healthy."]
    result = run_predict(model, tokenizer, questions, {"max_new_tokens": 24}, template_name="llama3", stream=False)
    stop_ids = sorted(generation_settings({}, tokenizer, get_template("llama3")).stop_ids())
    for question, entry in zip(questions, result["predictions"]):
        messages = [{"role": "user", "content": question}]
        prompt_ids = list(reference.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
        assert get_template("llama3").encode_prompt(tokenizer, messages) == prompt_ids
        assert entry["prompt"] == reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=24,
                              eos_token_id=stop_ids, pad_token_id=tokenizer.pad_id)
        new = out[0, len(prompt_ids):].tolist()
        if new and new[-1] in stop_ids:
            new = new[:-1]
        assert entry["predict"] == tokenizer.decode(new)
