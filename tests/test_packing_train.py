"""Training and eval read packed data without a flag (the actual_seq_len column selects it), and
a step over packed rows is the step over the same samples unpacked; bucketed batches of unpacked
rows give the losses of full-length rows. The 2-worker and kill -9 runs are `slow`."""
import json
import os
import signal
import subprocess
import sys
import time

import mindspore as ms
import numpy as np
import pytest

from trainkit import (ROOT, TINY_MODEL, assert_same_run, cli_args, env, losses, run_msrun, run_python,
                      worker_logs)
from mindsft.data.mindrecord import write_mindrecord
from mindsft.data.packing import pack_samples
from mindsft.data.preprocess import pad_record

IGNORE = -100
SEQ = 32
# Head size 32 (hidden 64 / 2 heads): the fused CPU attention kernel serves it, so training
# compiles the packed kernel into the step; GQA with one key/value head.
MODEL = {**TINY_MODEL, "hidden_size": 64, "num_heads": 2, "n_kv_heads": 1, "seq_length": SEQ}
NUM_SAMPLES = 24


def model_args(**extra):
    return {**{f"model.model_config.{k}": v for k, v in MODEL.items()}, **extra}


def random_samples(count, seed=0):
    """(ids, labels) of `count` samples of 1 to SEQ + 1 tokens: BOS, a prompt, a learned reply."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        length = int(rng.integers(1, SEQ + 2)) if rng.random() < 0.8 else int(rng.integers(1, 6))
        ids = rng.integers(3, MODEL["vocab_size"], length).astype(np.int32)
        ids[0] = 1
        labels = ids.copy()
        labels[:int(rng.integers(1, max(2, length // 2 + 1)))] = IGNORE
        samples.append((ids, labels))
    return samples


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    from trainkit import write_start_checkpoint
    folder = tmp_path_factory.mktemp("packing")
    samples = random_samples(NUM_SAMPLES)
    rows, summary = pack_samples(samples, SEQ + 1, 0, IGNORE)
    write_mindrecord(iter(rows), folder / "packed" / "train.mindrecord", "qa", partitions=2, packed=True)
    write_mindrecord((pad_record(ids, labels, SEQ, 0) for ids, labels in samples),
                     folder / "plain" / "train.mindrecord", "qa", partitions=2)
    write_start_checkpoint(folder / "start.ckpt", **{k: v for k, v in MODEL.items()})
    return folder, summary["rows"]


def train(output_dir, folder, data, **overrides):
    result = run_python(cli_args(output_dir, folder / data, folder / "start.ckpt", **model_args(**overrides)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_a_step_over_packed_rows_is_the_step_over_the_same_samples_unpacked(tmp_path, datasets):
    folder, rows = datasets
    assert rows < NUM_SAMPLES
    # One step per epoch over the whole set: the same samples in every step, packed or not.
    train(tmp_path / "packed", folder, "packed", **{"runner_config.batch_size": rows, "runner_config.epochs": 3})
    train(tmp_path / "plain", folder, "plain", **{"runner_config.batch_size": NUM_SAMPLES, "runner_config.epochs": 3})
    assert_same_run(tmp_path / "plain", tmp_path / "packed")
    assert len(losses(tmp_path / "packed")) == 3


def test_accumulation_on_packed_rows_reproduces_the_larger_batch(tmp_path, datasets):
    folder, _ = datasets
    train(tmp_path / "big", folder, "packed", **{"runner_config.batch_size": 4, "runner_config.epochs": 2})
    train(tmp_path / "accum", folder, "packed", **{"runner_config.batch_size": 2, "runner_config.epochs": 2,
                                                   "runner_config.gradient_accumulation_steps": 2})
    assert_same_run(tmp_path / "big", tmp_path / "accum")


def test_lora_on_packed_rows_is_lora_on_the_same_samples_unpacked(tmp_path, datasets):
    folder, rows = datasets
    lora = {"finetuning_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_target": "all",
            "runner_config.epochs": 3}
    train(tmp_path / "packed", folder, "packed", **{"runner_config.batch_size": rows, **lora})
    train(tmp_path / "plain", folder, "plain", **{"runner_config.batch_size": NUM_SAMPLES, **lora})
    np.testing.assert_allclose(losses(tmp_path / "packed"), losses(tmp_path / "plain"), atol=1e-5, rtol=0)
    name = "checkpoint/llama_tiny_final_lora.ckpt"
    packed = ms.load_checkpoint(str(tmp_path / "packed" / name))
    plain = ms.load_checkpoint(str(tmp_path / "plain" / name))
    for key in plain:
        np.testing.assert_allclose(packed[key].asnumpy(), plain[key].asnumpy(), atol=2e-5, rtol=0, err_msg=key)


def test_eval_on_packed_rows_reports_the_loss_of_the_samples_unpacked(tmp_path, datasets):
    folder, _ = datasets
    results = {}
    for data in ("packed", "plain"):
        out = tmp_path / data
        # Batch 3 divides neither set: the last batch is padded with rows that learn nothing.
        args = cli_args(out, folder / data, folder / "start.ckpt",
                        **model_args(run_mode="eval", **{"runner_config.batch_size": 3}))
        result = run_python(args + ["--eval_dataset_dir", str(folder / data)])
        assert result.returncode == 0, result.stderr[-3000:]
        results[data] = json.loads((out / "eval_results.json").read_text())
    assert results["packed"]["eval_loss"] == pytest.approx(results["plain"]["eval_loss"], abs=1e-5)


@pytest.mark.parametrize("data", ["packed", "plain"])
def test_every_row_read_once_per_epoch_on_every_rank_layout(datasets, data):
    from mindsft.train.batches import ShardedBatches
    folder, rows = datasets
    total = rows if data == "packed" else NUM_SAMPLES
    from mindsft.data.mindrecord import read_mindrecord
    stored = read_mindrecord(folder / data / "train.mindrecord", 2)
    expected = sorted((r["input_ids"].tobytes(), int((r["labels"] != IGNORE).sum())) for r in stored)
    assert len(expected) == total
    for batch_size, ranks in ((5, 1), (3, 2), (total, 2)):
        rows_read = []
        for rank in range(ranks):
            reader = ShardedBatches(folder / data, SEQ, batch_size, data_parallel=ranks, rank=rank, shuffle=True,
                                    drop_remainder=False)
            for micro in reader.epoch(0):
                for batch in micro:
                    assert batch["input_ids"].shape == (batch_size, SEQ + 1)
                    assert ("actual_seq_len" in batch) == (data == "packed")
                    rows_read += [(ids.tobytes(), int((labels != IGNORE).sum()))
                                  for ids, labels in zip(batch["input_ids"], batch["labels"])]
        # Padding slots repeat a row that was read, learning nothing; every row is read once.
        learned = sorted(row for row in rows_read if row[1])
        assert learned == [row for row in expected if row[1]]
        assert {ids for ids, _ in rows_read} == {ids for ids, _ in expected}
        assert len(rows_read) - len(expected) < batch_size * ranks


def test_bucketed_batches_give_the_losses_of_full_length_rows(tmp_path, datasets):
    folder, _ = datasets
    settings = {"runner_config.batch_size": 4, "runner_config.epochs": 2}
    train(tmp_path / "full", folder, "plain", **settings, **{"train_dataset.pad_to_multiple_of": 0})
    result = train(tmp_path / "bucketed", folder, "plain", **settings, **{"train_dataset.pad_to_multiple_of": 8})
    assert_same_run(tmp_path / "full", tmp_path / "bucketed")
    assert "bucketed batches: the step was compiled for" in result.stdout


def test_bad_boundaries_fail_with_one_line_naming_the_record(tmp_path, datasets):
    folder, _ = datasets
    rows = [{"input_ids": np.ones(SEQ + 1, np.int32), "labels": np.ones(SEQ + 1, np.int32),
             "actual_seq_len": np.array(ends, np.int32)} for ends in ([SEQ + 1], [9, 4, SEQ + 1])]
    write_mindrecord(iter(rows), tmp_path / "bad" / "train.mindrecord", "qa", packed=True)
    result = run_python(cli_args(tmp_path / "out", tmp_path / "bad", folder / "start.ckpt", **model_args()))
    assert result.returncode != 0
    assert "record 1: actual_seq_len [9, 4, 33] is not increasing offsets within the row of 33 tokens" in \
        result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_two_workers_on_packed_rows_reproduce_one_worker_with_twice_the_batch(tmp_path, datasets):
    folder, _ = datasets
    settings = {"runner_config.epochs": 2}
    train(tmp_path / "single", folder, "packed", **{"runner_config.batch_size": 4, **settings})
    out = tmp_path / "dp2"
    result = run_msrun(cli_args(out, folder / "packed", folder / "start.ckpt",
                                **model_args(**{"runner_config.batch_size": 2, **settings})), tmp_path / "logs")
    assert result.returncode == 0, worker_logs(tmp_path / "logs")
    assert_same_run(tmp_path / "single", out)


@pytest.mark.slow
def test_two_workers_of_qlora_on_packed_rows_reproduce_one_worker_with_twice_the_batch(tmp_path, datasets):
    """QLoRA, packing and data parallel together: every worker quantizes the same base alike."""
    folder, _ = datasets
    settings = {"runner_config.epochs": 2, "finetuning_type": "lora", "lora_rank": 4, "lora_alpha": 8,
                "lora_target": "all", "quantization_bit": 4}
    result = train(tmp_path / "single", folder, "packed", **{"runner_config.batch_size": 4, **settings})
    assert "QLoRA base (4-bit nf4, double quantization)" in result.stdout
    out = tmp_path / "dp2"
    result = run_msrun(cli_args(out, folder / "packed", folder / "start.ckpt",
                                **model_args(**{"runner_config.batch_size": 2, **settings})), tmp_path / "logs")
    assert result.returncode == 0, worker_logs(tmp_path / "logs")
    assert len(losses(out)) == len(losses(tmp_path / "single")) > 0
    np.testing.assert_allclose(losses(out), losses(tmp_path / "single"), atol=1e-5, rtol=0)
    name = "checkpoint/llama_tiny_final_lora.ckpt"
    single, parallel = ms.load_checkpoint(str(tmp_path / "single" / name)), ms.load_checkpoint(str(out / name))
    assert single.keys() == parallel.keys() and all(".mindpet_delta_lora_" in key for key in single)
    for key in single:
        # 2e-5 as assert_same_run allows: Adam amplifies rounding-level gradient differences.
        np.testing.assert_allclose(parallel[key].asnumpy(), single[key].asnumpy(), atol=2e-5, rtol=0, err_msg=key)


@pytest.mark.slow
def test_kill_and_resume_on_packed_rows_gives_the_uninterrupted_run(tmp_path, datasets):
    folder, _ = datasets
    settings = {"runner_config.batch_size": 2, "runner_config.epochs": 30, "callbacks.1.save_checkpoint_steps": 10,
                "callbacks.1.keep_checkpoint_max": 2}
    train(tmp_path / "whole", folder, "packed", **settings)
    out = tmp_path / "killed"
    args = cli_args(out, folder / "packed", folder / "start.ckpt", **model_args(**settings))
    process = subprocess.Popen([sys.executable, str(ROOT / "run_mindformer.py"), *args], cwd=ROOT, env=env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    meta_path = out / "checkpoint" / "rank_0" / "meta.json"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        try:
            if json.loads(meta_path.read_text())["last_step"] >= 20:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    result = run_python(args + ["--resume_training", "True"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    assert_same_run(tmp_path / "whole", out, loss_tolerance=1e-6, weight_tolerance=1e-6)
