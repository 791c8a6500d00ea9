"""Processes the board starts: each a command line run from the project root in its own session,
with its output in a log file and its exit status written when it ends, all inside the job's
folder. Nothing of a job lives only in the board's memory: a board started again (or a page
reopened) finds running and finished jobs by their folders.

msrun starts its workers in sessions of their own, so a job's processes are not one process
group: each carries `MINDSFT_BOARD_JOB=<token>` in its environment (inherited by everything it
starts), and the board finds them by it in /proc, after a restart too.

A job folder holds `board_job.json` (kind, command, pid, start time), `board_job.log` and, once
the command has ended, `board_exit_status`. A training run's job folder is its output_dir.
"""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

from mindsft.output_files import write_text_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB_FILE = "board_job.json"
LOG_FILE = "board_job.log"
STATUS_FILE = "board_exit_status"
STOPPED_FILE = "board_stopped"   # stop was asked: whatever status the killed command leaves, it was stopped
# The shell writes the command's exit status when it ends; a job killed by stop has no status file.
WRAPPER = 'status_file=$1; shift; "$@"; echo $? > "$status_file"'


def display(argv):
    """The command as a person types it in the project root."""
    return shlex.join(argv)


TAG = "MINDSFT_BOARD_JOB"


def job_env(token):
    """The board's own environment, with its python first on PATH (the command says `python`)
    and MindSpore's INFO/WARNING lines quiet unless the person asked for them."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("GLOG_v", "3")
    env["PYTHONUNBUFFERED"] = "1"
    env[TAG] = token
    return env


def start(folder, kind, argv, info=None, append_log=False):
    """Run `argv` from the project root as a detached process whose files live in `folder`."""
    os.makedirs(folder, exist_ok=True)
    status_path = os.path.join(folder, STATUS_FILE)
    for leftover in (status_path, os.path.join(folder, STOPPED_FILE)):
        if os.path.exists(leftover):
            os.remove(leftover)
    token = f"{os.path.abspath(folder)}:{time.time_ns()}"
    with open(os.path.join(folder, LOG_FILE), "a" if append_log else "w") as log:
        log.write(f"$ {display(argv)}\n")
        log.flush()
        process = subprocess.Popen(["sh", "-c", WRAPPER, "sh", status_path, *argv], cwd=ROOT, env=job_env(token),
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    record = {"kind": kind, "command": argv, "display": display(argv), "pid": process.pid, "token": token,
              "started": time.time(), **(info or {})}
    write_text_atomic(os.path.join(folder, JOB_FILE), json.dumps(record, indent=2))
    return record


def read_job(folder):
    """The job record of `folder`, None when it holds none."""
    try:
        with open(os.path.join(folder, JOB_FILE), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def job_processes(record):
    """The pids of every live process the job started (those whose environment carries its token)."""
    marker = f"{TAG}={record.get('token')}".encode() + b"\0"
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read() + b"\0"
            with open(f"/proc/{name}/stat", "rb") as f:
                zombie = f.read().rsplit(b")", 1)[-1].split()[0] == b"Z"
        except OSError:
            continue
        if not zombie and (b"\0" + marker in b"\0" + environ):
            found.append(int(name))
    return found


def signal_all(pids, signum):
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def exit_status(folder):
    try:
        with open(os.path.join(folder, STATUS_FILE)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def state(folder):
    """running | finished | failed | stopped (killed, or ended with no status), None: no job."""
    record = read_job(folder)
    if record is None:
        return None
    status = exit_status(folder)
    if status != 0 and os.path.exists(os.path.join(folder, STOPPED_FILE)):
        return "running" if job_processes(record) else "stopped"
    if status is not None:
        return "finished" if status == 0 else "failed"
    return "running" if job_processes(record) else "stopped"


def stop(folder, grace_seconds=15.0):
    """End a running job and every process it started, msrun's workers included."""
    record = read_job(folder)
    if record is None or not job_processes(record):
        return False
    write_text_atomic(os.path.join(folder, STOPPED_FILE), f"{time.time()}\n")
    signal_all(job_processes(record), signal.SIGTERM)
    deadline = time.time() + grace_seconds
    while time.time() < deadline and job_processes(record):
        time.sleep(0.2)
    while job_processes(record):
        signal_all(job_processes(record), signal.SIGKILL)
        time.sleep(0.1)
    return True


def log_tail(folder, lines=40):
    """The last lines of the job's log; a progress bar's carriage returns keep only its last state."""
    try:
        with open(os.path.join(folder, LOG_FILE), "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(size - 65536, 0))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    shown = [line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
             for line in text.split("\n")]
    return "\n".join(shown[-lines:])


def error_line(folder):
    """The command's one-line error (`...error: ...`), else its last non-empty log line."""
    lines = [line for line in log_tail(folder, 400).split("\n") if line.strip()]
    errors = [line for line in lines if "error: " in line]
    if errors:
        return errors[-1].strip()
    return lines[-1].strip() if lines else ""
