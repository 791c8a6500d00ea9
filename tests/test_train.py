"""The training run on one process: global-batch normalisation, overfitting, resume after
kill -9, atomic checkpoints, logs, clear errors before work, HF round trip."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from trainkit import (ROOT, assert_same_run, cli_args, env, final_weights, kill_after_checkpoint, run_python,
                      write_qa_mindrecord, write_start_checkpoint)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_qa_mindrecord(folder / "qa", num_records=16)
    write_start_checkpoint(folder / "start.ckpt")
    return folder


def train(output_dir, dataset, **overrides):
    result = run_python(cli_args(output_dir, dataset / "qa", dataset / "start.ckpt", **overrides))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_accumulation_2_x_batch_b_reproduces_batch_2b(tmp_path, dataset):
    train(tmp_path / "big", dataset, **{"runner_config.batch_size": 4, "runner_config.epochs": 2})
    train(tmp_path / "accum", dataset, **{"runner_config.batch_size": 2, "runner_config.epochs": 2,
                                          "runner_config.gradient_accumulation_steps": 2})
    assert_same_run(tmp_path / "big", tmp_path / "accum")
    # The weights did move: the comparison above is not between two untouched models.
    start = {k: v.asnumpy() for k, v in __import__("mindspore").load_checkpoint(str(dataset / "start.ckpt")).items()}
    moved = final_weights(tmp_path / "big")
    assert max(np.abs(moved[k] - start[k]).max() for k in start) > 1e-3


def test_tiny_model_overfits_a_small_set_and_logs_what_a_person_watches(tmp_path):
    from mindsft.train.monitor import read_metrics, read_tensorboard_scalars
    data = tmp_path / "data"
    write_qa_mindrecord(data / "qa", num_records=4, seed=3)
    write_start_checkpoint(data / "start.ckpt")
    out = tmp_path / "out"
    train(out, data, **{"runner_config.batch_size": 4, "runner_config.epochs": 150, "lr_schedule.type": "constant",
                        "optimizer.learning_rate": 1e-2, "lr_schedule.learning_rate": 1e-2})
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["loss"] < 0.1 < rows[0]["loss"]
    for key in ("step", "epoch", "loss", "lr", "grad_norm", "loss_scale", "tokens_per_s", "samples_per_s",
                "step_time_s", "eta_s"):
        assert key in rows[-1]
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    scalars = read_tensorboard_scalars(events[0])
    assert [step for step, _ in scalars["loss"]] == [r["step"] for r in rows]
    np.testing.assert_allclose([v for _, v in scalars["loss"]], [r["loss"] for r in rows], rtol=1e-6)
    assert (out / "training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_killed_after_a_checkpoint_resumes_to_the_same_losses_and_weights(tmp_path, dataset):
    settings = {"runner_config.batch_size": 4, "runner_config.epochs": 40, "callbacks.1.save_checkpoint_steps": 10,
                "callbacks.1.keep_checkpoint_max": 3}
    train(tmp_path / "whole", dataset, **settings)
    out = tmp_path / "killed"
    args = cli_args(out, dataset / "qa", dataset / "start.ckpt", **settings)
    stopped_at = kill_after_checkpoint(args, out, 20)
    assert 20 <= stopped_at < 160
    result = run_python(args + ["--resume_training", "True"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {stopped_at}" in result.stdout
    assert_same_run(tmp_path / "whole", out, loss_tolerance=1e-6, weight_tolerance=1e-6)
    # keep_checkpoint_max 3: only the newest three remain.
    kept = sorted((out / "checkpoint" / "rank_0").glob("llama_tiny_rank_0-*.ckpt"))
    assert [p.name for p in kept] == [f"llama_tiny_rank_0-{s}.ckpt" for s in (140, 150, 160)]


WRITER = """
import sys
import numpy as np, mindspore as ms
from mindsft.train.checkpoint import save_training_checkpoint
folder, step, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
params = [ms.Parameter(ms.Tensor(np.full(size, step, np.float32)), name=f"w{i}") for i in range(4)]
save_training_checkpoint(folder, 0, "p", step, params, {}, {"global_step": step})
"""


def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    import mindspore as ms
    from mindsft.train.checkpoint import checkpoint_steps, resume_step
    folder = tmp_path / "checkpoint"
    subprocess.run([sys.executable, "-c", WRITER, str(folder), "1", "10"], env=env(), check=True, cwd=ROOT)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(folder), "2", str(40_000_000)], env=env(), cwd=ROOT)
    rank_dir = folder / "rank_0"
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".") for p in rank_dir.iterdir()):
        time.sleep(0.001)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert any(p.name.startswith(".") for p in rank_dir.iterdir()), "no partial file was seen"
    assert json.loads((rank_dir / "meta.json").read_text())["last_step"] == 1
    assert resume_step(folder, 1) == 1 and list(checkpoint_steps(folder, 0)) == [1]
    loaded = ms.load_checkpoint(str(checkpoint_steps(folder, 0)[1]))
    assert float(loaded["w0"].asnumpy()[0]) == 1.0


METRICS_REWRITE = """
import sys
from mindsft.train.monitor import trim_metrics
trim_metrics(sys.argv[1], int(sys.argv[2]))
"""

SUMMARY_WRITE = """
import sys, types
from mindsft.config import load_run_config
from mindsft.train.recipe import write_run_summary
from trainkit import TINY_YAML, model_overrides
config = load_run_config(str(TINY_YAML), {**model_overrides(), "output_dir": sys.argv[1]})
config.template = "x" * int(sys.argv[2])  # a summary large enough to be caught in the middle of its write
data = types.SimpleNamespace(num_records=16, dropped_per_epoch=0, global_batch=4, steps_per_epoch=4)
write_run_summary(config, data, 8, 1, types.SimpleNamespace(trainable_params=lambda: []))
"""


def kill_inside_a_write(script, args, folder, rng):
    """Run `script`, SIGKILL it at a random moment after its temporary file appears in `folder`."""
    process = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=ROOT,
                               env=dict(env(), PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}"), start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if any(".partial" in p.name for p in Path(folder).iterdir()):
            break
        time.sleep(0.0005)
    time.sleep(rng.uniform(0, 0.005))
    killed = process.poll() is None
    if killed:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return killed


def test_kill_during_the_metrics_rewrite_or_the_summary_write_leaves_a_whole_file(tmp_path):
    from mindsft.output_files import remove_partials
    rng = np.random.default_rng(7)
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": step, "loss": 1.0 / step, "note": "x" * 100} for step in range(1, 150_001)]
    original = "".join(json.dumps(row) + "\n" for row in rows)
    trimmed = "".join(json.dumps(row) + "\n" for row in rows[:140_000])
    summary = tmp_path / "run_summary.json"
    kills = []
    for _ in range(3):
        metrics.write_text(original)
        kills.append(kill_inside_a_write(METRICS_REWRITE, [metrics, 140_000], tmp_path, rng))
        assert metrics.read_text() in (original, trimmed)
        summary.write_text('{"old": true}')
        kills.append(kill_inside_a_write(SUMMARY_WRITE, [tmp_path, 10_000_000], tmp_path, rng))
        written = json.loads(summary.read_text())  # whole: the old one or the complete new one
        assert written == {"old": True} or len(written["template"]) == 10_000_000
        remove_partials(tmp_path)  # what a resume does with the killed writer's temporary file
        assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "run_summary.json"]
    assert any(kills[0::2]) and any(kills[1::2]), "no write was caught in the middle"


@pytest.mark.parametrize("case, message", [
    ("unknown_key", "did you mean 'learning_rate'"),
    ("missing_dataset", "dataset path does not exist"),
    ("empty_dataset", "the dataset is empty"),
    ("shape_mismatch", "shapes that disagree: model.tok_embeddings.embedding_weight (96, 32)"),
    ("model_parallel_on_cpu", "parallel_config.model_parallel 2"),
    ("records_too_short", "needs 33 (seq_length + 1)"),
])
def test_bad_configs_fail_with_one_message_before_any_work(tmp_path, dataset, case, message):
    from mindspore.mindrecord import FileWriter
    from mindsft.data.schema import mindrecord_schema
    data_dir, ckpt, overrides = dataset / "qa", dataset / "start.ckpt", {}
    if case == "unknown_key":
        overrides["optimizer.learning_rat"] = 1
    elif case == "missing_dataset":
        data_dir = tmp_path / "nowhere"
    elif case == "empty_dataset":
        writer = FileWriter(str(tmp_path / "empty.mindrecord"), shard_num=1, overwrite=True)
        writer.add_schema(mindrecord_schema("qa"), "qa")
        writer.commit()
        data_dir = tmp_path
    elif case == "shape_mismatch":
        ckpt = write_start_checkpoint(tmp_path / "other.ckpt", vocab_size=96)
    elif case == "model_parallel_on_cpu":
        overrides.update({"use_parallel": True, "parallel_config.model_parallel": 2})
    elif case == "records_too_short":
        overrides["model.model_config.seq_length"] = 32
    out = tmp_path / "out"
    result = run_python(cli_args(out, data_dir, ckpt, **overrides))
    assert result.returncode == 2
    assert message in result.stderr, result.stderr[-2000:]
    assert result.stderr.count("error:") == 1
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint").exists()


def test_eval_mode_reports_the_token_mean_loss_of_the_eval_set(tmp_path, dataset):
    import mindspore as ms
    from mindsft.models.llama import LlamaConfig, LlamaForCausalLM
    from mindsft.loading import assign_weights
    from trainkit import TINY_MODEL
    out = tmp_path / "eval"
    args = cli_args(out, dataset / "qa", dataset / "start.ckpt", run_mode="eval")
    args += ["--eval_dataset_dir", str(dataset / "qa")]
    result = run_python(args)
    assert result.returncode == 0, result.stderr[-3000:]
    reported = json.loads((out / "eval_results.json").read_text())
    # Reference: the model's loss terms over every record, in one process, without the trainer.
    model = LlamaForCausalLM(LlamaConfig(**TINY_MODEL))
    assign_weights(model, ms.load_checkpoint(str(dataset / "start.ckpt")))
    reader = ms.dataset.MindDataset(sorted(str(p) for p in (dataset / "qa").glob("*.mindrecord?")), shuffle=False)
    total, count = 0.0, 0.0
    for row in reader.create_dict_iterator(num_epochs=1, output_numpy=True):
        labels = np.where(row["input_ids"] == 0, -100, row["labels"])[None]
        part_sum, part_count = model.loss_terms(ms.Tensor(row["input_ids"][None]), ms.Tensor(labels))
        total, count = total + float(part_sum.asnumpy()), count + float(part_count.asnumpy())
    assert reported["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert reported["eval_perplexity"] == pytest.approx(np.exp(total / count), rel=1e-5)


def test_finetuned_from_a_converted_checkpoint_reverses_to_a_folder_transformers_loads(tmp_path, tiny_hf_dir):
    import torch
    import transformers
    tools = ROOT / "tools" / "convert_weight.py"
    if not tools.exists():
        pytest.skip("tools/convert_weight.py is not there yet")
    start = tmp_path / "start.ckpt"
    subprocess.run([sys.executable, str(tools), "--model", "llama", "--input_path", str(tiny_hf_dir),
                    "--output_path", str(start), "--no_progress"], env=env(), check=True, cwd=ROOT)
    hf_config = json.loads((tiny_hf_dir / "config.json").read_text())
    write_qa_mindrecord(tmp_path / "qa", num_records=8, vocab_size=hf_config["vocab_size"])
    shape = {f"model.model_config.{k}": v for k, v in
             dict(hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2, intermediate_size=128, vocab_size=512).items()}
    out = tmp_path / "out"
    result = run_python(cli_args(out, tmp_path / "qa", start, **shape, **{"runner_config.batch_size": 4}))
    assert result.returncode == 0, result.stderr[-3000:]
    hf_out = tmp_path / "hf"
    subprocess.run([sys.executable, str(tools), "--reversed", "--input_path", str(out / "checkpoint" / "llama_tiny_final.ckpt"),
                    "--output_path", str(hf_out), "--hf_config", str(tiny_hf_dir / "config.json"), "--no_progress"],
                   env=env(), check=True, cwd=ROOT)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_out).eval()
    trained = final_weights(out)
    np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(), trained["lm_head.weight"])
    before = transformers.LlamaForCausalLM.from_pretrained(tiny_hf_dir)
    assert not torch.equal(model.lm_head.weight, before.lm_head.weight)
