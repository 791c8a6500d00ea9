"""Data parallel over real msrun workers on this machine, against the single-process run."""
import subprocess

import pytest

from trainkit import (ROOT, assert_same_run, cli_args, env, free_port, losses, run_msrun, run_python,
                      worker_logs, write_qa_mindrecord, write_start_checkpoint)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_qa_mindrecord(folder / "qa", num_records=16)
    write_start_checkpoint(folder / "start.ckpt")
    return folder


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, dataset):
    out = tmp_path_factory.mktemp("single") / "out"
    result = run_python(cli_args(out, dataset / "qa", dataset / "start.ckpt",
                                 **{"runner_config.batch_size": 4, "runner_config.epochs": 2}))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_two_workers_with_batch_b_reproduce_one_worker_with_batch_2b(tmp_path, dataset, single_process_run):
    out = tmp_path / "dp2"
    result = run_msrun(cli_args(out, dataset / "qa", dataset / "start.ckpt",
                                **{"runner_config.batch_size": 2, "runner_config.epochs": 2}), tmp_path / "logs")
    assert result.returncode == 0, worker_logs(tmp_path / "logs")
    assert len(losses(out)) == len(losses(single_process_run)) == 8
    assert_same_run(single_process_run, out)
    assert (out / "checkpoint" / "rank_1" / "meta.json").exists()


def test_two_nodes_of_one_worker_each_train_together(tmp_path, dataset, single_process_run):
    out, port = tmp_path / "nodes", free_port()
    args = cli_args(out, dataset / "qa", dataset / "start.ckpt",
                    **{"runner_config.batch_size": 2, "runner_config.epochs": 2}) + ["--use_parallel", "True"]
    nodes = []
    for node_rank in (0, 1):
        command = ["bash", str(ROOT / "scripts" / "msrun_launcher.sh"), " ".join(["run_mindformer.py", *args]),
                   "2", "1", "127.0.0.1", str(port), str(node_rank), str(tmp_path / f"logs{node_rank}"), "True", "300"]
        nodes.append(subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [node.communicate(timeout=400)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs) + worker_logs(tmp_path / "logs0")
    assert "worker 1 log:" in outputs[1] and "exit status 0" in outputs[0]
    assert_same_run(single_process_run, out)


def test_semi_auto_parallel_of_data_parallelism_only_runs_as_data_parallel_over_the_workers(
        tmp_path, dataset, single_process_run):
    # MindFormers' research YAMLs: parallel_mode 1, data_parallel 8, optimizer sharding, sequence
    # parallelism; on 2 CPU workers that is the data-parallel run, said in one line each.
    out = tmp_path / "semi_auto"
    result = run_msrun(cli_args(out, dataset / "qa", dataset / "start.ckpt",
                                **{"runner_config.batch_size": 2, "runner_config.epochs": 2,
                                   "parallel.parallel_mode": 1, "parallel_config.data_parallel": 8,
                                   "parallel.enable_parallel_optimizer": True,
                                   "parallel_config.use_seq_parallel": True}), tmp_path / "logs")
    logs = worker_logs(tmp_path / "logs")
    assert result.returncode == 0, logs
    for line in ("parallel.parallel_mode 1 with data parallelism only: runs as data parallel over the msrun workers",
                 "parallel_config.data_parallel 8: 2 workers run, so data parallel is 2",
                 "parallel.enable_parallel_optimizer True: the optimizer state is not sharded on CPU"):
        assert line in logs
    assert_same_run(single_process_run, out)


@pytest.mark.parametrize("args, message", [
    ([], "expected 1, 2, 6 or 9 arguments, got 0"),
    (["run_mindformer.py", "two"], "WORKER_NUM must be a positive integer"),
    (["run_mindformer.py", "2", "3", "127.0.0.1", "8118", "0", "out", "True", "60"], "LOCAL_WORKER 3 exceeds"),
    (["run_mindformer.py", "2", "8118", "out", "Maybe", "60"], "JOIN must be True or False"),
    (["no_such_script.py --x 1", "2"], "script 'no_such_script.py'"),
])
def test_launcher_validates_its_arguments(args, message):
    result = subprocess.run(["bash", str(ROOT / "scripts" / "msrun_launcher.sh"), *args], cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and message in result.stderr
