"""run_predict: prompts from strings and files, rendered in the training template, replies equal
to transformers' greedy generate on the converted weights, predictions and metrics written."""
import io
import json
import math

import mindspore as ms
import numpy as np
import pytest
import torch
import transformers

from mindsft.convert.convert import hf_to_ms
from mindsft.errors import DataError
from mindsft.metrics import similarity_scores
from mindsft.models.families import model_config_from_hf
from mindsft.models.llama import LlamaForCausalLM
from mindsft.loading import assign_weights
from mindsft.predict import PREDICTIONS_FILE, RESULTS_FILE, run_predict
from mindsft.demo_model import SAMPLE_ALPACA, write_tiny_hf_llama
from mindsft.templates import get_template
from mindsft.tokenizer import LlamaTokenizer

GREEDY_32 = {"max_new_tokens": 32, "do_sample": False}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny HF Llama with weights large enough for varied replies, converted to a .ckpt and
    loaded into our model; with the transformers model of the same folder as the reference."""
    root = tmp_path_factory.mktemp("predict")
    hf_dir = root / "hf"
    write_tiny_hf_llama(hf_dir, seed=3, initializer_range=0.25)
    ckpt = root / "model.ckpt"
    hf_to_ms(str(hf_dir), str(ckpt), progress=False)
    with open(hf_dir / "config.json") as f:
        model = LlamaForCausalLM(model_config_from_hf(json.load(f)))
    arrays = {name: p.asnumpy() for name, p in ms.load_checkpoint(str(ckpt)).items()}
    assign_weights(model, arrays, source=str(ckpt))
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return model, LlamaTokenizer(hf_dir / "tokenizer.model"), hf


def hf_reply(hf, tokenizer, prompt_ids, max_new_tokens=32, **settings):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens,
                          eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, **settings)
    new = out[0, len(prompt_ids):].tolist()
    if new and new[-1] == tokenizer.eos_id:
        new = new[:-1]
    return tokenizer.decode(new)


def test_replies_equal_transformers_greedy_on_converted_weights(converted, tmp_path):
    model, tokenizer, hf = converted
    questions = ["What is the capital of France?", "Give three tips for staying healthy.",
                 "Write a short poem about the sea and the wind that blows over it."]
    result = run_predict(model, tokenizer, questions, GREEDY_32, template_name="vicuna_v1.1",
                         output_dir=tmp_path, stream=False)
    template = get_template("vicuna_v1.1")
    replies = []
    for question, entry in zip(questions, result["predictions"]):
        messages = [{"role": "user", "content": question}]
        assert entry["prompt"] == template.render_prompt(messages)
        assert entry["prompt"].endswith("ASSISTANT:")
        expected = hf_reply(hf, tokenizer, template.encode_prompt(tokenizer, messages))
        assert entry["predict"] == expected
        replies.append(expected)
    assert len(set(" ".join(replies).split())) >= 8
    lines = (tmp_path / PREDICTIONS_FILE).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == result["predictions"]
    metrics = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert metrics["num_prompts"] == 3 and metrics["decode_tokens_per_second"] > 0
    assert metrics["prefill_tokens"] == sum(len(template.encode_prompt(tokenizer, [
        {"role": "user", "content": q}])) for q in questions)


def test_beam_search_replies_equal_transformers_num_beams_4(converted):
    model, tokenizer, hf = converted
    questions = ["What is the capital of France?", "Write a short poem about the sea."]
    settings = {"max_new_tokens": 16, "num_beams": 4, "length_penalty": 0.5, "early_stopping": True}
    out = io.StringIO()
    result = run_predict(model, tokenizer, questions[:1], settings, template_name="vicuna_v1.1", stream=out)
    result["predictions"] += run_predict(model, tokenizer, questions[1:], settings, template_name="vicuna_v1.1",
                                         stream=False)["predictions"]
    template = get_template("vicuna_v1.1")
    for question, entry in zip(questions, result["predictions"]):
        prompt_ids = template.encode_prompt(tokenizer, [{"role": "user", "content": question}])
        assert entry["predict"] == hf_reply(hf, tokenizer, prompt_ids, 16, num_beams=4, length_penalty=0.5,
                                            early_stopping=True)
    assert out.getvalue() == ""  # the best beam is known only at the end: nothing is streamed


def test_alpaca_records_give_labels_bleu_rouge_and_the_training_loss(converted, tmp_path):
    model, tokenizer, hf = converted
    with open(SAMPLE_ALPACA, encoding="utf-8") as f:
        records = json.load(f)[:4]
    data = tmp_path / "heldout.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    result = run_predict(model, tokenizer, str(data), {"max_new_tokens": 12}, template_name="alpaca",
                         output_dir=tmp_path / "out", batch_size=3, stream=False)
    predictions, metrics = result["predictions"], result["metrics"]
    assert [p["label"] for p in predictions] == [r["output"] for r in records]
    expected = similarity_scores([p["predict"] for p in predictions], [r["output"] for r in records])
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value)
    # The loss is transformers' loss on the same conversations, weighted by learned tokens.
    template = get_template("alpaca")
    from mindsft.templates import encode_segments
    total, count = 0.0, 0
    for record, prediction in zip(records, predictions):
        from mindsft.data.conversations import normalize_record
        ids, learned = encode_segments(tokenizer, template.segments(normalize_record(record)))
        labels = [t if keep else -100 for t, keep in zip(ids, learned)]
        with torch.no_grad():
            loss = hf(torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
        learned_count = sum(1 for label in labels[1:] if label != -100)
        total, count = total + loss * learned_count, count + learned_count
    assert metrics["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert json.loads((tmp_path / "out" / RESULTS_FILE).read_text())["num_labelled"] == 4


def test_sharegpt_jsonl_label_is_the_last_reply_and_history_is_kept(converted, tmp_path):
    model, tokenizer, _ = converted
    record = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                                {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]}
    open_ended = {"conversations": [{"from": "human", "value": "Count to three."}]}
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps(record) + "\n" + json.dumps(open_ended) + "\n", encoding="utf-8")
    result = run_predict(model, tokenizer, str(data), {"max_new_tokens": 4}, template_name="vicuna_v1.1",
                         stream=False, compute_loss=False)
    first, second = result["predictions"]
    assert first["label"] == "Blue." and "label" not in second
    assert first["prompt"].endswith("USER: Name a colour. ASSISTANT:") and "ASSISTANT: Hello!</s>" in first["prompt"]
    assert result["metrics"]["num_labelled"] == 1


def test_txt_file_gives_one_prompt_per_non_empty_line_in_raw_mode(converted, tmp_path):
    model, tokenizer, _ = converted
    data = tmp_path / "prompts.txt"
    data.write_text("Once upon a time\n\nThe best way to learn is\n", encoding="utf-8")
    result = run_predict(model, tokenizer, str(data), {"max_new_tokens": 3}, template_name="raw", stream=False)
    assert [p["prompt"] for p in result["predictions"]] == ["Once upon a time", "The best way to learn is"]


def test_a_single_prompt_streams_its_reply(converted):
    model, tokenizer, _ = converted
    out = io.StringIO()
    result = run_predict(model, tokenizer, "Tell me about the moon.", GREEDY_32, template_name="vicuna_v1.1",
                         stream=out)
    assert out.getvalue() == result["predictions"][0]["predict"] + "\n"


def test_sampled_predictions_repeat_with_a_seed(converted):
    model, tokenizer, _ = converted
    settings = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.0, "top_p": 0.9, "seed": 11}
    runs = [run_predict(model, tokenizer, ["Hello", "Why is the sky blue?"], settings, stream=False)
            for _ in range(2)]
    assert runs[0]["predictions"] == runs[1]["predictions"]


def test_missing_file_and_bad_record_are_named_and_leave_no_output(converted, tmp_path):
    model, tokenizer, _ = converted
    with pytest.raises(DataError, match="prompts.jsonl: prompt file not found"):
        run_predict(model, tokenizer, str(tmp_path / "prompts.jsonl"), output_dir=tmp_path / "out")
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"instruction": "ok"}, {"question": "no known field"}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json: record 1: no 'conversations', 'messages' or 'instruction'"):
        run_predict(model, tokenizer, str(data), output_dir=tmp_path / "out")
    assert not (tmp_path / "out" / PREDICTIONS_FILE).exists()
