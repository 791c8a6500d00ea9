"""Evaluation by generation (eval_dataset.predict_with_generate): the prompts and reference
replies come out of the eval records exactly, a training run with do_eval writes BLEU-4 and
ROUGE of the model's replies into metrics.jsonl and TensorBoard, equal to what run_mode eval
computes on the checkpoint it saved, and the loss curve draws the eval loss too."""
import json

import pytest

from mindsft.data.alpaca import convert_alpaca
from mindsft.data.mindrecord import shard_names
from mindsft.data.preprocess import PreprocessOptions, preprocess
from mindsft.generation_eval import reply_samples
from mindsft.metrics import METRIC_NAMES
from mindsft.demo_model import SAMPLE_ALPACA, sample_texts, train_tokenizer
from mindsft.templates import get_template
from mindsft.tokenizer import LlamaTokenizer
from trainkit import TINY_YAML, model_overrides, run_python, write_start_checkpoint


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generation_eval")
    model_file = train_tokenizer(sample_texts(), str(folder / "tokenizer.model"))
    convert_alpaca(SAMPLE_ALPACA, folder / "conv.json")
    return folder, model_file


def test_prompts_and_references_are_the_records_question_and_reply(sample, tmp_path):
    folder, model_file = sample
    output = tmp_path / "d.mindrecord"
    preprocess(PreprocessOptions(input_glob=str(folder / "conv.json"), model_file=model_file,
                                 output_file=str(output), seq_length=512, progress=False, file_partition=2))
    samples = reply_samples(shard_names(str(output), 2), limit=5)
    conversations = json.loads((folder / "conv.json").read_text(encoding="utf-8"))
    tokenizer = LlamaTokenizer(model_file)
    template = get_template("vicuna_v1.1")
    assert len(samples) == 5
    for (prompt, reply), record in zip(samples, conversations):
        question, answer = record["conversations"][0]["value"], record["conversations"][1]["value"]
        assert prompt == template.encode_prompt(tokenizer, [{"role": "user", "content": question}])
        assert reply[-1] == tokenizer.eos_id and tokenizer.decode(reply[:-1]) == answer


def test_training_scores_generations_as_run_mode_eval_does_on_its_checkpoint(sample, tmp_path):
    from mindsft.train.monitor import read_metrics, read_tensorboard_scalars
    folder, model_file = sample
    preprocess(PreprocessOptions(input_glob=str(folder / "conv.json"), model_file=model_file,
                                 output_file=str(tmp_path / "data/d.mindrecord"), seq_length=64, template="raw",
                                 val_size=16, progress=False))
    vocab_size = LlamaTokenizer(model_file).vocab_size
    write_start_checkpoint(tmp_path / "start.ckpt", vocab_size=vocab_size)
    settings = {**model_overrides(vocab_size=vocab_size, seq_length=64), "runner_config.batch_size": 8,
                "runner_config.epochs": 4, "optimizer.learning_rate": 1e-2, "lr_schedule.learning_rate": 1e-2,
                "lr_schedule.type": "constant", "eval_step_interval": 7,
                "eval_dataset.predict_with_generate": True, "eval_dataset.generate_samples": 6,
                "generation_config.max_new_tokens": 12, "processor.tokenizer.vocab_file": model_file}
    args = ["--config", str(TINY_YAML), "--train_dataset_dir", str(tmp_path / "data"), "--do_eval", "True"]
    for key, value in settings.items():
        args += [f"--{key}", str(value)]
    trained = run_python(args + ["--output_dir", str(tmp_path / "out"), "--load_checkpoint", str(tmp_path / "start.ckpt")])
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    rows = read_metrics(tmp_path / "out/metrics.jsonl")
    evaluated = [r for r in rows if "eval_loss" in r]
    last_step = max(r["step"] for r in rows if "loss" in r)
    # 58 or 59 train records (one may be dropped as too long) make 7 steps of 8 an epoch.
    assert last_step == 28 and [r["step"] for r in evaluated] == [7, 14, 21, 28]
    names = [f"eval_{name}" for name in METRIC_NAMES]
    assert all(name in evaluated[-1] for name in names)
    scalars = read_tensorboard_scalars(next((tmp_path / "out/tensorboard").glob("events.out.tfevents.*")))
    assert [step for step, _ in scalars["eval_bleu-4"]] == [r["step"] for r in evaluated]
    assert "eval at step 7: loss" in trained.stdout and " rouge-l " in trained.stdout

    final = tmp_path / "out/checkpoint/llama_tiny_final.ckpt"
    evaluated_alone = run_python(args + ["--run_mode", "eval", "--output_dir", str(tmp_path / "eval"),
                                         "--load_checkpoint", str(final)])
    assert evaluated_alone.returncode == 0, evaluated_alone.stderr[-3000:]
    results = json.loads((tmp_path / "eval/eval_results.json").read_text())
    for name in names + ["eval_loss"]:
        assert results[name] == pytest.approx(evaluated[-1][name], rel=1e-6, abs=1e-9), name
    # The comparison means something only if the trained model's replies overlap the references.
    assert results["eval_rouge-1"] > 0
    assert (tmp_path / "out/training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
