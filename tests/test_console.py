"""What a person sees while training: on a terminal one progress bar (loss, lr, ETA) and a log
line every per_print_times steps; off a terminal log lines only, no bar; MindSpore's own log
lines stay in msrun's worker logs, out of the launcher's output."""
import io
import re
import subprocess
import sys

import pytest

from mindsft.train.monitor import TERMINAL_PRINT_EVERY, TrainingMonitor
from trainkit import ROOT, cli_args, env, write_qa_mindrecord, write_start_checkpoint

BAR_CONTROLS = re.compile(r"\r|\x1b\[")
MINDSPORE_LOG_LINE = re.compile(r"^\[(DEBUG|INFO|WARNING)\] [A-Z_]+\(\d+[,:]", re.M)
STEP_LINE = re.compile(r"^step (\d+)/(\d+) epoch \d+ loss [\d.]+ lr ", re.M)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def record(step):
    return {"step": step, "epoch": 1, "loss": 2.5 - step / 100, "lr": 1e-4, "grad_norm": 1.0, "loss_scale": 1.0,
            "tokens": 512, "samples": 4}


def monitor_output(tmp_path, stream, steps=25, **kwargs):
    monitor = TrainingMonitor(str(tmp_path), steps, 0, True, stream=stream, **kwargs)
    for step in range(1, steps + 1):
        monitor.log_step(record(step), 0.05, first_step_of_run=step == 1)
    monitor.close()
    return stream.getvalue()


def test_off_a_terminal_every_step_is_a_line_and_there_is_no_bar(tmp_path):
    output = monitor_output(tmp_path, io.StringIO())
    assert not BAR_CONTROLS.search(output)
    assert [int(m.group(1)) for m in STEP_LINE.finditer(output)] == list(range(1, 26))


def test_on_a_terminal_one_bar_with_loss_lr_eta_and_a_line_every_few_steps(tmp_path):
    output = monitor_output(tmp_path, Terminal())
    assert "\r" in output
    last_bar = output.rsplit("\r", 1)[-1]
    assert re.search(r"25/25 \[.*loss 2\.2500, lr 1\.00e-04, ETA 0:00:00\]", last_bar)
    expected = list(range(TERMINAL_PRINT_EVERY, 26, TERMINAL_PRINT_EVERY)) + [25]
    assert [int(m.group(1)) for m in re.finditer(r"step (\d+)/25 epoch", output)] == expected


def test_per_print_times_sets_the_line_interval_on_either(tmp_path):
    for stream in (io.StringIO(), Terminal()):
        output = monitor_output(tmp_path, stream, steps=7, print_every=3)
        assert [int(m) for m in re.findall(r"step (\d+)/7 epoch", output)] == [3, 6, 7]


def quiet_env():
    """The environment a user has: GLOG_v unset, so MindSpore logs at its default level."""
    environment = env()
    environment.pop("GLOG_v", None)
    return environment


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_qa_mindrecord(folder / "qa", num_records=16)
    write_start_checkpoint(folder / "start.ckpt")
    return folder


def test_a_run_with_stdout_not_a_terminal_prints_lines_without_bar_or_mindspore_logs(tmp_path, dataset):
    args = cli_args(tmp_path / "out", dataset / "qa", dataset / "start.ckpt",
                    **{"runner_config.batch_size": 4, "runner_config.epochs": 2})
    result = subprocess.run([sys.executable, str(ROOT / "run_mindformer.py"), *args], cwd=ROOT, env=quiet_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert not BAR_CONTROLS.search(output)
    assert not MINDSPORE_LOG_LINE.search(output), MINDSPORE_LOG_LINE.search(output).group(0)
    assert [int(m.group(1)) for m in STEP_LINE.finditer(result.stdout)] == list(range(1, 9))


@pytest.mark.slow
def test_msrun_launcher_output_holds_the_run_and_worker_logs_hold_mindspore(tmp_path, dataset):
    from trainkit import free_port
    args = cli_args(tmp_path / "out", dataset / "qa", dataset / "start.ckpt",
                    **{"runner_config.batch_size": 2, "runner_config.epochs": 1}) + ["--use_parallel", "True"]
    command = ["bash", str(ROOT / "scripts" / "msrun_launcher.sh"), " ".join(["run_mindformer.py", *args]),
               "2", str(free_port()), str(tmp_path / "logs"), "True", "300"]
    result = subprocess.run(command, cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert not BAR_CONTROLS.search(output)
    assert not MINDSPORE_LOG_LINE.search(output), MINDSPORE_LOG_LINE.search(output).group(0)
    assert [int(m.group(1)) for m in STEP_LINE.finditer(output)] == [1, 2, 3, 4]
    assert "exit status 0" in output
    # Nothing is lost: the worker log keeps MindSpore's lines (cluster set-up at least).
    assert MINDSPORE_LOG_LINE.search((tmp_path / "logs" / "worker_0.log").read_text(errors="replace"))
