"""run_mindformer.py --run_mode predict: the model is asked in the template its training data
used (carried from llama_preprocess's manifest through the run), and its replies are written."""
import json
import os

import pytest
import torch
import transformers

import run_mindformer
from mindsft.convert.convert import hf_to_ms
from mindsft.demo_model import write_tiny_hf_llama
from mindsft.templates import get_template
from mindsft.tokenizer import LlamaTokenizer

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "llama2", "finetune_llama_tiny_cpu.yaml")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_predict")
    hf_dir = root / "hf"
    write_tiny_hf_llama(hf_dir, seed=3, initializer_range=0.25)
    run_dir = root / "run"
    (run_dir / "checkpoint").mkdir(parents=True)
    ckpt = run_dir / "checkpoint" / "model.ckpt"
    hf_to_ms(str(hf_dir), str(ckpt), progress=False)
    return hf_dir, run_dir, ckpt


def predict(ckpt, hf_dir, output_dir, *extra):
    code = run_mindformer.main([
        "--config", CONFIG, "--run_mode", "predict", "--load_checkpoint", str(ckpt),
        "--processor.tokenizer.vocab_file", str(hf_dir / "tokenizer.model"),
        "--predict_data", "What is the capital of Peru?", "--max_new_tokens", "12",
        "--output_dir", str(output_dir), *extra])
    assert code == 0
    with open(output_dir / "generated_predictions.jsonl") as f:
        return [json.loads(line) for line in f]


def transformers_reply(hf_dir, prompt_ids, max_new_tokens=12):
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=2, pad_token_id=0)
    tokens = out[0, len(prompt_ids):].tolist()
    if 2 in tokens:
        tokens = tokens[:tokens.index(2)]
    return LlamaTokenizer(hf_dir / "tokenizer.model").decode(tokens)


def test_template_comes_from_the_training_runs_summary(converted, tmp_path):
    hf_dir, run_dir, ckpt = converted
    (run_dir / "run_summary.json").write_text(json.dumps({"template": "llama-2"}))
    try:
        [entry] = predict(ckpt, hf_dir, tmp_path / "out")
    finally:
        (run_dir / "run_summary.json").unlink()
    messages = [{"role": "user", "content": "What is the capital of Peru?"}]
    assert entry["prompt"] == get_template("llama-2").render_prompt(messages)
    prompt_ids = get_template("llama-2").encode_prompt(LlamaTokenizer(hf_dir / "tokenizer.model"), messages)
    assert entry["predict"] == transformers_reply(hf_dir, prompt_ids)


def test_template_flag_overrides_and_raw_is_plain_completion(converted, tmp_path):
    hf_dir, _, ckpt = converted
    [entry] = predict(ckpt, hf_dir, tmp_path / "out", "--template", "raw")
    assert entry["prompt"] == "What is the capital of Peru?"


def test_a_base_model_without_training_record_continues_plain_text_and_says_so(converted, tmp_path, capsys):
    hf_dir, _, ckpt = converted
    [entry] = predict(ckpt, hf_dir, tmp_path / "out")
    assert entry["prompt"] == "What is the capital of Peru?"
    printed = capsys.readouterr().out
    assert f"template: raw (no training record beside {ckpt}" in printed
    assert json.loads((tmp_path / "out" / "predict_results.json").read_text())["template"] == "raw"
    # One prompt compiles both graphs on its first calls: the figures say so instead of a slow rate.
    assert "prefill: every call compiled, no timing" in printed and "s of graph compilation" in printed


def test_predict_without_tokenizer_says_what_to_set(converted, tmp_path, capsys):
    _, _, ckpt = converted
    code = run_mindformer.main(["--config", CONFIG, "--run_mode", "predict", "--load_checkpoint", str(ckpt),
                                "--predict_data", "hi", "--output_dir", str(tmp_path)])
    assert code == 2
    assert "processor.tokenizer.vocab_file" in capsys.readouterr().err
