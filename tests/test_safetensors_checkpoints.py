"""MindFormers 1.5+'s checkpoint format: `checkpoint_format: safetensors` writes training
checkpoints (and final weights) as safetensors with a checksum per tensor; a run resumes from
one exactly as from a `.ckpt`, and a damaged one is named."""
import json
import shutil

import numpy as np
import pytest

from mindsft.errors import MindsftError
from mindsft.loading import load_checkpoint_arrays
from trainkit import cli_args, losses, run_python, write_qa_mindrecord, write_start_checkpoint

SETTINGS = {"runner_config.batch_size": 4, "runner_config.epochs": 4, "callbacks.1.save_checkpoint_steps": 4,
            "callbacks.1.checkpoint_format": "safetensors", "callbacks.1.keep_checkpoint_max": 10}


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("safetensors_run")
    write_qa_mindrecord(root / "qa", num_records=16)
    write_start_checkpoint(root / "start.ckpt")
    result = run_python(cli_args(root / "whole", root / "qa", root / "start.ckpt", **SETTINGS))
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_a_run_writes_safetensors_checkpoints_that_transformers_tools_can_read(whole_run):
    from safetensors.numpy import load_file
    folder = whole_run / "whole" / "checkpoint"
    assert {p.name for p in (folder / "rank_0").glob("llama_tiny_rank_0-*")} == \
        {f"llama_tiny_rank_0-{step}.safetensors" for step in (4, 8, 12, 16)}
    final = folder / "llama_tiny_final.safetensors"
    ours = load_checkpoint_arrays(str(final))
    theirs = load_file(str(final))
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])


def test_resume_from_a_safetensors_checkpoint_continues_exactly(whole_run, tmp_path):
    resumed = tmp_path / "resumed"
    (resumed / "checkpoint" / "rank_0").mkdir(parents=True)
    name = "llama_tiny_rank_0-8.safetensors"
    shutil.copy(whole_run / "whole" / "checkpoint" / "rank_0" / name, resumed / "checkpoint" / "rank_0" / name)
    (resumed / "checkpoint" / "rank_0" / "meta.json").write_text(json.dumps({"last_step": 8, "checkpoint": name}))
    args = cli_args(resumed, whole_run / "qa", whole_run / "start.ckpt", **SETTINGS) + ["--resume_training", "True"]
    result = run_python(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 8" in result.stdout
    np.testing.assert_allclose(losses(resumed), losses(whole_run / "whole")[8:], atol=1e-6, rtol=0)
    final = "checkpoint/llama_tiny_final.safetensors"
    want, got = load_checkpoint_arrays(str(whole_run / "whole" / final)), load_checkpoint_arrays(str(resumed / final))
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6, rtol=0, err_msg=key)


def test_a_damaged_safetensors_checkpoint_is_named(whole_run, tmp_path):
    damaged = tmp_path / "damaged.safetensors"
    shutil.copy(whole_run / "whole" / "checkpoint" / "llama_tiny_final.safetensors", damaged)
    data = bytearray(damaged.read_bytes())
    data[-10] ^= 0xFF    # inside the last tensor's values
    damaged.write_bytes(bytes(data))
    with pytest.raises(MindsftError, match="damaged.safetensors is damaged: tensor .* fails its checksum"):
        load_checkpoint_arrays(str(damaged))
