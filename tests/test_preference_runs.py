"""stage: dpo runs as SFT runs: gradient accumulation and 2 msrun workers reproduce one batch of
the same pairs, and a run killed with -9 resumes to the same losses, metrics and weights."""
import numpy as np
import pytest

from trainkit import (assert_same_run, cli_args, kill_after_checkpoint, run_msrun, run_python, worker_logs,
                      write_pair_mindrecord, write_start_checkpoint)

pytestmark = pytest.mark.slow
DPO = {"stage": "dpo", "pref_beta": 0.5, "lr_schedule.type": "constant", "optimizer.learning_rate": 5e-3,
       "lr_schedule.learning_rate": 5e-3}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    write_pair_mindrecord(folder / "pairs", num_records=16)
    write_start_checkpoint(folder / "start.ckpt")
    return folder


def train(output_dir, dataset, **overrides):
    result = run_python(cli_args(output_dir, dataset / "pairs", dataset / "start.ckpt", **DPO, **overrides))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metric(output_dir, name):
    from mindsft.train.monitor import read_metrics
    return [r[name] for r in read_metrics(output_dir / "metrics.jsonl") if name in r]


def assert_same_metrics(dir_a, dir_b):
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        np.testing.assert_allclose(metric(dir_a, name), metric(dir_b, name), rtol=1e-4, atol=1e-5, err_msg=name)


def test_accumulation_2_x_batch_b_reproduces_batch_2b(tmp_path, dataset):
    train(tmp_path / "big", dataset, **{"runner_config.batch_size": 4, "runner_config.epochs": 2})
    train(tmp_path / "accum", dataset, **{"runner_config.batch_size": 2, "runner_config.epochs": 2,
                                          "runner_config.gradient_accumulation_steps": 2})
    assert_same_run(tmp_path / "big", tmp_path / "accum")
    assert_same_metrics(tmp_path / "big", tmp_path / "accum")
    assert max(metric(tmp_path / "big", "rewards/margins")) > 0.05  # the policy moved off its reference


def test_two_workers_reproduce_one_worker_with_twice_the_batch_under_lora(tmp_path, dataset):
    lora = {"finetuning_type": "lora", "lora_rank": 4, "runner_config.epochs": 2}
    train(tmp_path / "single", dataset, **{"runner_config.batch_size": 4, **lora})
    out = tmp_path / "dp2"
    result = run_msrun(cli_args(out, dataset / "pairs", dataset / "start.ckpt", **DPO,
                                **{"runner_config.batch_size": 2, **lora}), tmp_path / "logs")
    assert result.returncode == 0, worker_logs(tmp_path / "logs")
    assert len(metric(out, "loss")) == 8
    # 5e-5: each rank sums its own pairs before the all-reduce, a different order of fp32 additions,
    # which Adam's per-weight normalisation carries into later steps (measured: 1.0e-5 at step 7).
    np.testing.assert_allclose(metric(out, "loss"), metric(tmp_path / "single", "loss"), atol=5e-5, rtol=0)
    assert_same_metrics(tmp_path / "single", out)
    assert (out / "peft_adapter" / "adapter_config.json").is_file()


def test_run_killed_after_a_checkpoint_resumes_to_the_same_losses_and_weights(tmp_path, dataset):
    settings = {"runner_config.batch_size": 4, "runner_config.epochs": 30, "callbacks.1.save_checkpoint_steps": 10,
                "precompute_ref_log_probs": True}
    train(tmp_path / "whole", dataset, **settings)
    out = tmp_path / "killed"
    args = cli_args(out, dataset / "pairs", dataset / "start.ckpt", **DPO, **settings)
    stopped_at = kill_after_checkpoint(args, out, 20)
    result = run_python(args + ["--resume_training", "True"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {stopped_at}" in result.stdout
    # The reference is the one the first run computed from the start weights, not the resumed model.
    assert "precomputed" not in result.stdout
    assert_same_run(tmp_path / "whole", out, loss_tolerance=1e-6, weight_tolerance=1e-6)
    assert_same_metrics(tmp_path / "whole", out)
