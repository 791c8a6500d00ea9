"""The board's parts without a browser: the command lines and YAML its fields make, the detached
jobs it finds and stops (a process that left the job's session included, as msrun's workers
do), and the Prepare tab's preview, whose learned tokens are exactly the labels llama_preprocess
writes."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mindsft.board import forms, jobs
from mindsft.config import load_run_config
from mindsft.errors import ConfigError, OutputError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "mindsft" / "sample_data" / "alpaca_sample.json"


@pytest.fixture(scope="module")
def dataset(tiny_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("board_parts") / "data" / "train.mindrecord"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "llama_preprocess.py"), "--dataset_type", "qa",
                             "--input_glob", str(SAMPLE), "--model_file", str(tiny_hf_dir), "--seq_length", "64",
                             "--output_file", str(out), "--template", "alpaca", "--no_progress"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out


def fields(tiny_hf_dir, dataset, **changes):
    return {"model": str(tiny_hf_dir), "dataset_dir": str(dataset.parent), "finetuning_type": "lora",
            "epochs": "2", "batch_size": "2", "seq_length": "64", "workers": "1", **changes}


def test_the_run_yaml_reads_back_as_the_config_the_board_checked(tiny_hf_dir, dataset, tmp_path):
    plan = forms.train_plan(fields(tiny_hf_dir, dataset, learning_rate="3e-4", lora_rank="4"), str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    Path(plan["yaml_path"]).write_text(plan["yaml"])
    config = load_run_config(plan["yaml_path"])
    assert config.to_dict() == plan["config"].to_dict()
    assert config.lora.rank == 4 and config.optimizer.learning_rate == 3e-4
    assert config.pretrained_model_dir == str(tiny_hf_dir) and config.model_config.family == "llama"


def test_one_worker_runs_run_mindformer_and_several_run_the_msrun_launcher(tiny_hf_dir, dataset, tmp_path):
    one = forms.train_plan(fields(tiny_hf_dir, dataset), str(tmp_path / "a"))
    assert one["argv"] == ["python", "run_mindformer.py", "--config", str(tmp_path / "a" / "train.yaml")]
    two = forms.train_plan(fields(tiny_hf_dir, dataset, workers="2", port="9123"), str(tmp_path / "b"))
    yaml_path = tmp_path / "b" / "train.yaml"
    assert two["argv"] == ["bash", "scripts/msrun_launcher.sh", f"run_mindformer.py --config {yaml_path} --use_parallel True",
                           "2", "9123", str(tmp_path / "b" / "msrun_log"), "True", "7200"]
    assert two["config"].parallel_config.data_parallel == 2 and two["config"].use_parallel
    resumed = forms.train_argv(str(yaml_path), 2, 9124, "logs", resume=True)
    assert "--resume_training True" in resumed[2]


def test_a_wrong_field_is_the_run_configs_own_error(tiny_hf_dir, dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.yaml: runner_config\.batch_size"):
        forms.train_plan(fields(tiny_hf_dir, dataset, batch_size="two"), str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="quantization_bit 3 is not 4 or 8"):
        forms.train_plan(fields(tiny_hf_dir, dataset, finetuning_type="qlora", quantization_bit="3"), str(tmp_path / "r"))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    plan = forms.train_plan(fields(tiny_hf_dir, dataset, output_dir=str(occupied)), str(tmp_path / "unused"))
    with pytest.raises(OutputError, match="holds other files"):
        forms.check_train_inputs(plan, lambda folder: False)


def wait_state(folder, wanted, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if jobs.state(folder) == wanted:
            return
        time.sleep(0.1)
    raise AssertionError(f"{folder}: {jobs.state(folder)}, not {wanted}")


def test_jobs_are_found_by_their_folder_finished_failed_or_stopped(tmp_path):
    jobs.start(tmp_path / "ok", "test", ["python", "-c", "print('done')"])
    wait_state(tmp_path / "ok", "finished")
    assert "done" in jobs.log_tail(tmp_path / "ok")
    jobs.start(tmp_path / "bad", "test", ["python", "-c", "import sys; print('x.py: error: no such file'); sys.exit(2)"])
    wait_state(tmp_path / "bad", "failed")
    assert jobs.error_line(tmp_path / "bad") == "x.py: error: no such file"
    # A child in a session of its own (msrun starts its workers so) is still the job's: stop ends it.
    jobs.start(tmp_path / "long", "test", ["sh", "-c", "setsid sleep 60 & sleep 60"])
    wait_state(tmp_path / "long", "running")
    time.sleep(0.5)
    record = jobs.read_job(tmp_path / "long")
    assert len(jobs.job_processes(record)) >= 3
    assert jobs.stop(tmp_path / "long")
    assert jobs.state(tmp_path / "long") == "stopped" and not jobs.job_processes(record)


def test_the_preview_marks_learned_exactly_the_tokens_preprocessing_labels(tiny_hf_dir, dataset):
    from mindsft.board.preview import data_summary, model_summary
    from mindsft.data.mindrecord import read_mindrecord
    from mindsft.data.schema import IGNORE_INDEX
    info = model_summary(str(tiny_hf_dir))
    assert (info["family"], info["hidden_size"], info["num_layers"]) == ("llama", 64, 2)
    summary = data_summary([str(SAMPLE)], str(tiny_hf_dir), "alpaca", 64)
    assert summary["files"] == [{"path": str(SAMPLE), "records": 75}]
    first = read_mindrecord(dataset)[0]
    ids = [token["id"] for token in summary["tokens"]]
    assert list(first["input_ids"][:len(ids)]) == ids
    # Labels are unshifted: a learned token is one whose label is itself.
    assert [t["learned"] for t in summary["tokens"]] == [int(x) != IGNORE_INDEX for x in first["labels"][:len(ids)]]
    assert "".join(t["text"] for t in summary["tokens"] if t["learned"]).startswith("The capital of France is Paris.")


def test_qlora_mixing_and_export_fields_make_the_command_lines_flags(tiny_hf_dir, dataset, tmp_path):
    qlora = forms.train_plan(fields(tiny_hf_dir, dataset, finetuning_type="qlora", quantization_bit="8"), str(tmp_path / "q"))
    assert qlora["config"].quantization_bit == 8 and qlora["config"].lora is not None
    argv = forms.preprocess_command({"model": str(tiny_hf_dir), "data": ["a.json", "b.jsonl"], "mix_weights": ["0.7", "0.3"],
                                     "template": "alpaca", "seq_length": "64", "packing": True, "val_size": "0.1",
                                     "output_file": str(tmp_path / "out.mindrecord")})
    joined = " ".join(argv)
    assert f"--input_glob {os.path.abspath('a.json')} {os.path.abspath('b.jsonl')} " in joined
    for flag in ("--mix_weights 0.7 0.3", "--template alpaca", "--packing", "--val_size 0.1", f"--model_file {tiny_hf_dir}"):
        assert flag in joined
    # A LoRA run exports through merge_lora (base + the run's PEFT adapter); a full run converts its final weights.
    run = tmp_path / "lora_run"
    run.mkdir()
    lora_plan = forms.train_plan(fields(tiny_hf_dir, dataset), str(run))
    Path(lora_plan["yaml_path"]).write_text(lora_plan["yaml"])
    (run / "peft_adapter").mkdir()
    assert forms.export_command({"run_dir": str(run), "hf_output": str(tmp_path / "hf")}) == [
        "python", "tools/merge_lora.py", "--base", str(tiny_hf_dir), "--adapter", str(run / "peft_adapter"),
        "--no_progress", "--hf_output", str(tmp_path / "hf")]
    full = tmp_path / "full_run"
    full.mkdir()
    full_plan = forms.train_plan(fields(tiny_hf_dir, dataset, finetuning_type="full"), str(full))
    Path(full_plan["yaml_path"]).write_text(full_plan["yaml"])
    assert forms.export_command({"run_dir": str(full), "hf_output": str(tmp_path / "hf")}) == [
        "python", "tools/convert_weight.py", "--reversed", "--input_path",
        str(full / "checkpoint" / "llama_final.ckpt"), "--output_path", str(tmp_path / "hf")]


def test_the_page_fetches_nothing_from_outside():
    page = (ROOT / "mindsft" / "board" / "page.html").read_text()
    for reference in ("http://", "https://", "src=", "href=", "@import", "url("):
        assert reference not in page, reference


def test_a_board_started_later_finds_runs_inside_and_outside_its_folder_and_stops_them(tmp_path):
    import json
    import signal
    import socket
    import urllib.request
    pytest.importorskip("fastapi")
    runs_dir = tmp_path / "runs"
    inside, outside = runs_dir / "a_run", tmp_path / "elsewhere" / "b_run"
    for folder in (inside, outside):
        # A stand-in for a training run started by an earlier board: its YAML and a long command.
        folder.mkdir(parents=True)
        (folder / "train.yaml").write_text("run_mode: finetune\n")
        jobs.start(folder, "train", ["sleep", "60"])
    (runs_dir / "runs_elsewhere.txt").write_text(f"{outside}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    board = subprocess.Popen([sys.executable, str(ROOT / "tools" / "board.py"), "--port", str(port),
                              "--runs_dir", str(runs_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def call(path, body=None):
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST" if body else "GET",
                                         data=json.dumps(body).encode() if body else None,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    try:
        deadline = time.time() + 60
        while True:
            try:
                listed = call("/api/runs")["runs"]
                break
            except OSError:
                assert time.time() < deadline and board.poll() is None, board.stdout.read()
                time.sleep(0.3)
        assert [(run["output_dir"], run["state"]) for run in listed] == [(str(inside), "running"),
                                                                         (str(outside), "running")]
        assert call("/api/runs/stop", {"output_dir": str(outside)})["state"] == "stopped"
        assert call("/api/runs/stop", {"output_dir": str(inside)})["state"] == "stopped"
        assert [run["state"] for run in call("/api/runs")["runs"]] == ["stopped", "stopped"]
    finally:
        board.send_signal(signal.SIGTERM)
        board.wait(timeout=20)
        for folder in (inside, outside):
            jobs.stop(folder)
