"""LoRA through the training run: `finetuning_type: lora` trains adapters only, checkpoints hold
only adapters (a small fraction of the model), resume continues exactly, and the result merges."""
import shutil

import mindspore as ms
import numpy as np
import pytest

from trainkit import ROOT, cli_args, losses, run_python, write_qa_mindrecord, write_start_checkpoint

LORA = {"finetuning_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_target": "all"}
# Constant LR so that a run's first steps do not depend on how many steps it has in all.
STEADY = {"runner_config.batch_size": 4, "lr_schedule.type": "constant", "optimizer.learning_rate": 1e-2,
          "lr_schedule.learning_rate": 1e-2, "callbacks.1.save_checkpoint_steps": 4}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_data")
    write_qa_mindrecord(folder / "qa", num_records=8, seed=5)
    # A larger init than 0.02: with a near-zero frozen head no adapter can move the loss much.
    write_start_checkpoint(folder / "start.ckpt", seed=1, initializer_range=0.2)
    return folder


def train(output_dir, dataset, **overrides):
    result = run_python(cli_args(output_dir, dataset / "qa", dataset / "start.ckpt", **{**LORA, **STEADY, **overrides}))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def ckpt_arrays(path):
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


def test_lora_run_learns_and_saves_only_adapters(tmp_path, dataset):
    out = tmp_path / "out"
    result = train(out, dataset, **{"runner_config.epochs": 12})
    assert "trainable params:" in result.stdout
    loss = losses(out)
    assert np.mean(loss[-4:]) < 0.8 * np.mean(loss[:4])
    final = ckpt_arrays(out / "checkpoint" / "llama_tiny_final_lora.ckpt")
    assert final and all(".mindpet_delta_lora_" in name for name in final)
    step_ckpt = sorted((out / "checkpoint" / "rank_0").glob("*.ckpt"))[-1]
    held = ckpt_arrays(step_ckpt)
    assert not [name for name in held if name.startswith(("model.", "lm_head.")) and "lora_" not in name]
    assert any(name.startswith("adam_m.") and "lora_" in name for name in held)
    # A full fine-tuning checkpoint holds the weights and two Adam moments: three times start.ckpt.
    assert step_ckpt.stat().st_size < (dataset / "start.ckpt").stat().st_size
    assert (out / "peft_adapter" / "adapter_model.safetensors").is_file()


def test_lora_run_merges_into_a_full_checkpoint(tmp_path, dataset):
    out = tmp_path / "out"
    train(out, dataset, **{"runner_config.epochs": 4})
    merged = tmp_path / "merged.ckpt"
    result = run_python(["--base", str(dataset / "start.ckpt"), "--adapter", str(out / "peft_adapter"),
                         "--output", str(merged)], script=ROOT / "tools" / "merge_lora.py")
    assert result.returncode == 0, result.stderr[-3000:]
    base, after = ckpt_arrays(dataset / "start.ckpt"), ckpt_arrays(merged)
    assert base.keys() == after.keys()
    changed = [name for name in base if not np.array_equal(base[name], after[name])]
    assert "model.layers.0.attention.wq.weight" in changed
    assert "model.norm_out.weight" not in changed


def test_lora_run_resumes_to_the_same_losses(tmp_path, dataset):
    train(tmp_path / "whole", dataset, **{"runner_config.epochs": 6})
    train(tmp_path / "first", dataset, **{"runner_config.epochs": 3})
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "first", resumed)
    train(resumed, dataset, **{"runner_config.epochs": 6, "resume_training": True})
    np.testing.assert_allclose(losses(resumed), losses(tmp_path / "whole"), atol=1e-6, rtol=0)
    whole = ckpt_arrays(tmp_path / "whole" / "checkpoint" / "llama_tiny_final_lora.ckpt")
    again = ckpt_arrays(resumed / "checkpoint" / "llama_tiny_final_lora.ckpt")
    for name in whole:
        np.testing.assert_allclose(again[name], whole[name], atol=1e-6, rtol=0, err_msg=name)
