"""What a run promises about the user's files: nothing is deleted or replaced unasked, a damaged
checkpoint is named (and resume steps back to the newest intact one), meta.json and leftover
partial files do not stop a resume, and the last short batch of an epoch counts only real records."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_bad_inputs import flip_byte_in_tensor, put, run_tool
from trainkit import (ROOT, TINY_MODEL, assert_same_run, cli_args, env, losses, run_python, write_qa_mindrecord,
                      write_start_checkpoint)


# ------------------------------------------------------------------------------ outputs

def test_a_file_output_never_replaces_a_folder_even_an_empty_one(tmp_path):
    from mindsft.errors import OutputError
    from mindsft.output_files import atomic_output
    (tmp_path / "out.json").mkdir()
    with pytest.raises(OutputError, match="out.json is an existing folder"):
        with atomic_output(tmp_path / "out.json", overwrite=True) as tmp:
            Path(tmp).write_text("{}")
    assert (tmp_path / "out.json").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_folder_output_replaces_a_non_empty_folder_only_when_asked(tmp_path):
    from mindsft.errors import OutputError
    from mindsft.output_files import atomic_output

    def write_folder(overwrite):
        with atomic_output(tmp_path / "out", folder=True, overwrite=overwrite) as tmp:
            os.makedirs(tmp)
            put(tmp, "new.txt", "new")

    put(tmp_path / "out", "old.txt", "old")
    with pytest.raises(OutputError, match="not empty; give a new folder, or --overwrite"):
        write_folder(overwrite=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["old.txt"]
    write_folder(overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    put(tmp_path, "a_file", "x")
    with pytest.raises(OutputError, match="a_file is an existing file, not a folder"):
        with atomic_output(tmp_path / "a_file", folder=True, overwrite=True) as tmp:
            os.makedirs(tmp)


def test_reverse_overwrite_replaces_a_previous_conversion_but_never_a_folder_of_other_files(tiny_hf_dir, tmp_path):
    def convert_weight_main(argv):
        return run_tool("convert", argv)

    ckpt = tmp_path / "m.ckpt"
    reverse = ["--reversed", "--input_path", ckpt, "--hf_config", tiny_hf_dir / "config.json", "--no_progress"]
    assert convert_weight_main(["--input_path", tiny_hf_dir, "--output_path", ckpt, "--no_progress"]) == 0
    assert convert_weight_main(reverse + ["--output_path", tmp_path / "hf"]) == 0
    assert convert_weight_main(reverse + ["--output_path", tmp_path / "hf"]) == 1
    assert convert_weight_main(reverse + ["--output_path", tmp_path / "hf", "--overwrite"]) == 0
    put(tmp_path / "mine", "notes.txt", "mine")
    assert convert_weight_main(reverse + ["--output_path", tmp_path / "mine", "--overwrite"]) == 1
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------ checkpoints

def test_converted_weights_carry_mindspores_checksum_and_damage_is_named_by_both_readers(tiny_hf_dir, tmp_path):
    import mindspore as ms
    from mindsft.convert import hf_to_ms
    from mindsft.convert.ckpt_format import read_ckpt
    from mindsft.errors import CheckpointError
    path = tmp_path / "model.ckpt"
    hf_to_ms(tiny_hf_dir, path, progress=False)
    ms.load_checkpoint(str(path), crc_check=True)  # MindSpore verifies our trailer and accepts it
    flip_byte_in_tensor(path, "model.layers.1.attention.wv.weight")
    with pytest.raises(CheckpointError, match=f"{path} is damaged"):
        read_ckpt(path)
    # MindSpore's own check agrees (its crc error reaches the caller wrapped as "Failed to read").
    with pytest.raises(ValueError, match="Failed to read the checkpoint file"):
        ms.load_checkpoint(str(path), crc_check=True)
    ms.load_checkpoint(str(path))  # without crc_check MindSpore loads the damaged values silently


WRITE_STEPS = """
import sys
import numpy as np, mindspore as ms
from mindsft.train.checkpoint import save_training_checkpoint
folder = sys.argv[1]
for step in (1, 2):
    params = [ms.Parameter(ms.Tensor(np.full(64, step, np.float32)), name=f"w{i}") for i in range(2)]
    save_training_checkpoint(folder, 0, "p", step, params, {}, {"global_step": step})
"""


def test_resume_skips_a_damaged_checkpoint_and_an_unreadable_meta_json_with_a_warning(tmp_path, capsys):
    from mindsft.loading import load_checkpoint_arrays
    from mindsft.train.checkpoint import checkpoint_steps, resume_step
    subprocess.run([sys.executable, "-c", WRITE_STEPS, str(tmp_path)], env=env(), cwd=ROOT, check=True)
    meta = tmp_path / "rank_0" / "meta.json"
    meta.write_text("")
    assert resume_step(tmp_path, 1) == 2
    assert f"{meta} is damaged" in capsys.readouterr().err
    newest = checkpoint_steps(tmp_path, 0)[2]
    flip_byte_in_tensor(newest, "w1")
    assert resume_step(tmp_path, 1) == 1
    assert f"resume skips {newest} is damaged" in capsys.readouterr().err
    assert float(load_checkpoint_arrays(checkpoint_steps(tmp_path, 0)[1])["w0"][0]) == 1.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_qa_mindrecord(folder / "qa", num_records=16)
    write_start_checkpoint(folder / "start.ckpt")
    return folder


def test_resume_after_damage_takes_the_previous_checkpoint_cleans_partials_and_ends_as_the_whole_run(
        tmp_path, dataset):
    settings = {"runner_config.batch_size": 4, "runner_config.epochs": 2, "callbacks.1.save_checkpoint_steps": 2,
                "callbacks.1.keep_checkpoint_max": 10}
    out = tmp_path / "run"
    args = cli_args(out, dataset / "qa", dataset / "start.ckpt", **settings)
    result = run_python(args)
    assert result.returncode == 0, result.stderr[-3000:]
    whole = Path(shutil.copytree(out, tmp_path / "whole"))
    rank_dir = out / "checkpoint" / "rank_0"
    damaged = rank_dir / "llama_tiny_rank_0-8.ckpt"
    flip_byte_in_tensor(damaged, "model.layers.0.attention.wq.weight")
    # What kills at the wrong moment leave behind: a checkpoint's and the metrics' temporary files.
    leftovers = [put(rank_dir, ".llama_tiny_rank_0-10.ckpt.x1.partial", b"half"),
                 put(out, ".metrics.jsonl.x2.partial", "half")]
    result = run_python(args + ["--resume_training", "True"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resume skips {damaged} is damaged" in result.stderr
    assert "llama_tiny_rank_0-6.ckpt at step 6" in result.stdout
    assert not any(p.exists() for p in leftovers)
    assert len(losses(out)) == 8
    assert_same_run(whole, out, loss_tolerance=1e-6, weight_tolerance=1e-6)


# ------------------------------------------------------------------------------ the last, short batch

def test_eval_of_a_record_count_that_is_not_a_multiple_of_the_batch_is_the_mean_over_every_record(tmp_path):
    import mindspore as ms
    from mindsft.models.llama import LlamaConfig, LlamaForCausalLM
    from mindsft.loading import assign_weights
    write_qa_mindrecord(tmp_path / "qa", num_records=13, shard_num=1)
    write_start_checkpoint(tmp_path / "start.ckpt")
    out = tmp_path / "eval"
    args = cli_args(out, tmp_path / "qa", tmp_path / "start.ckpt", run_mode="eval",
                    **{"runner_config.batch_size": 6}) + ["--eval_dataset_dir", str(tmp_path / "qa")]
    result = run_python(args)
    assert result.returncode == 0, result.stderr[-3000:]
    reported = json.loads((out / "eval_results.json").read_text())
    model = LlamaForCausalLM(LlamaConfig(**TINY_MODEL))
    assign_weights(model, ms.load_checkpoint(str(tmp_path / "start.ckpt")))
    total, count = 0.0, 0.0
    reader = ms.dataset.MindDataset(str(tmp_path / "qa" / "train.mindrecord"), shuffle=False)
    for row in reader.create_dict_iterator(num_epochs=1, output_numpy=True):
        labels = np.where(row["input_ids"] == 0, -100, row["labels"])[None]
        part_sum, part_count = model.loss_terms(ms.Tensor(row["input_ids"][None]), ms.Tensor(labels))
        total, count = total + float(part_sum.asnumpy()), count + float(part_count.asnumpy())
    assert reported["records"] == 13
    assert reported["eval_loss"] == pytest.approx(total / count, rel=1e-5)


SHORT_BATCH_STEP = """
import json, sys
import numpy as np, mindspore as ms
from mindsft.models.llama import LlamaConfig, LlamaForCausalLM
from mindsft.loading import assign_weights
from mindsft.train.batches import ShardedBatches
from mindsft.train.step import AdamWUpdate, TrainStep
from trainkit import TINY_MODEL
data_dir, start = sys.argv[1], sys.argv[2]
ms.set_context(mode=ms.GRAPH_MODE)
data = ShardedBatches(data_dir, TINY_MODEL["seq_length"], 4, shuffle=False, drop_remainder=False)
steps = list(data.epoch(0))
(batch,) = steps[-1]
real = (batch["labels"] != -100).any(axis=1)
result = {"steps": len(steps), "real_rows": real.tolist(),
          "padding_learns_nothing": bool((batch["labels"][~real] == -100).all())}
weights = {k: v.asnumpy() for k, v in ms.load_checkpoint(start).items()}
real_only = {name: column[real] for name, column in batch.items()}
for name, micro_batch in (("padded", batch), ("real_only", real_only)):
    model = LlamaForCausalLM(LlamaConfig(**TINY_MODEL))
    assign_weights(model, weights)
    params = model.trainable_params()
    step = TrainStep(model, params, AdamWUpdate(params, 0.9, 0.999, 1e-8, 0.0), max_grad_norm=1.0)
    loss, grad_norm, _ = step.step([micro_batch], 1e-3, 1.0)
    result[name] = {"loss": float(loss), "grad_norm": float(grad_norm),
                    "weights": {p.name: p.asnumpy().ravel()[:64].tolist() for p in params}}
print(json.dumps(result))
"""


def test_padding_slots_of_a_short_last_training_batch_learn_nothing_and_leave_the_loss_unchanged(tmp_path):
    write_qa_mindrecord(tmp_path / "qa", num_records=10, shard_num=1)
    write_start_checkpoint(tmp_path / "start.ckpt")
    result = subprocess.run([sys.executable, "-c", SHORT_BATCH_STEP, str(tmp_path / "qa"), str(tmp_path / "start.ckpt")],
                            env=dict(env(), PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}"), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["steps"] == 3 and found["real_rows"] == [True, True, False, False] and found["padding_learns_nothing"]
    padded, real_only = found["padded"], found["real_only"]
    assert padded["loss"] == pytest.approx(real_only["loss"], abs=1e-6)
    assert padded["grad_norm"] == pytest.approx(real_only["grad_norm"], rel=1e-5)
    for name, values in real_only["weights"].items():
        np.testing.assert_allclose(padded["weights"][name], values, atol=1e-6, err_msg=name)
