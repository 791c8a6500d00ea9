"""Helpers shared by the training benchmarks: run a command as its own process and read back its
peak resident memory, its printed RESULT line, and thread settings of both frameworks."""
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RESULT "


def bench_env(**extra):
    """Environment for child processes: quiet MindSpore, the repo importable, the venv's msrun on PATH."""
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(ROOT), **{k: str(v) for k, v in extra.items()})
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def run_measured(command, log_path, env=None, timeout=600, cwd=ROOT):
    """Run `command` alone; returns (exit code, output text, peak RSS MiB of its largest process, wall s).

    os.wait4 gives the rusage of this one child (and the descendants it waited for), so the peak
    is per command even when several run one after another from the same script.
    """
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=cwd, env=env or bench_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    # ru_maxrss is in KiB on Linux.
    return proc.returncode, Path(log_path).read_text(errors="replace"), usage.ru_maxrss / 1024.0, seconds


def print_result(result):
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def read_result(output):
    """The last RESULT line a worker printed, as a dict (None if there is none)."""
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else None


def self_peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def mindspore_threads():
    import mindspore as ms
    return {"runtime_num_threads": ms.get_context("runtime_num_threads"),
            "inter_op_parallel_num": ms.get_context("inter_op_parallel_num")}


def set_torch_threads(count):
    """Intra-op threads = MindSpore's runtime threads; one inter-op thread (eager runs ops in order)."""
    import torch
    torch.set_num_threads(count)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel op
        pass
    return {"num_threads": torch.get_num_threads(), "num_interop_threads": torch.get_num_interop_threads()}


def ratio(a, b):
    return a / b if b else float("nan")
