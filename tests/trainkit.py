"""Helpers for the training tests: real MindRecord files, a real starting checkpoint, and
running run_mindformer.py in-process, as a subprocess, or under real msrun workers."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "configs" / "llama2" / "finetune_llama_tiny_cpu.yaml"
# Small enough that a whole run takes seconds on 2 cores.
TINY_MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "n_kv_heads": 2, "intermediate_size": 64,
              "vocab_size": 128, "seq_length": 16}


def model_overrides(**extra):
    return {f"model.model_config.{k}": v for k, v in {**TINY_MODEL, **extra}.items()}


def write_qa_mindrecord(folder, num_records=16, seq_length=TINY_MODEL["seq_length"], vocab_size=128, seed=0,
                        shard_num=2, dataset_type="qa"):
    """Records of seq_length+1 tokens: a prompt (labels -100), an answer, then padding 0."""
    from mindspore.mindrecord import FileWriter
    from mindsft.data.schema import mindrecord_schema
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for _ in range(num_records):
        length = seq_length + 1
        used = int(rng.integers(length // 2, length + 1))
        prompt = int(rng.integers(1, used // 2 + 1))
        input_ids = np.zeros(length, np.int32)
        input_ids[:used] = rng.integers(3, vocab_size, used)
        input_ids[0] = 1
        labels = np.full(length, -100, np.int32)
        labels[prompt:used] = input_ids[prompt:used]
        row = {"input_ids": input_ids}
        if dataset_type == "qa":
            row["labels"] = labels
        rows.append(row)
    writer = FileWriter(os.path.join(folder, "train.mindrecord"), shard_num=shard_num, overwrite=True)
    writer.add_schema(mindrecord_schema(dataset_type), dataset_type)
    writer.write_raw_data(rows)
    writer.commit()
    return folder


def write_start_checkpoint(path, seed=0, **model):
    """A random tiny Llama saved as a MindSpore .ckpt (the start of a fine-tuning run)."""
    import mindspore as ms
    from mindsft.models.llama import LlamaConfig
    from mindsft.demo_model import random_llama_arrays
    from mindsft.models.families import hf_to_ms_arrays
    config = LlamaConfig(**{**TINY_MODEL, **model})
    arrays = hf_to_ms_arrays(random_llama_arrays(config, seed), config)
    # MindSpore's own checksum trailer, which mindsft verifies on load like its own files'.
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in arrays.items()], str(path), crc_check=True)
    return path


def cli_args(output_dir, dataset_dir, load_checkpoint=None, **overrides):
    args = ["--config", str(TINY_YAML), "--output_dir", str(output_dir), "--train_dataset_dir", str(dataset_dir)]
    if load_checkpoint:
        args += ["--load_checkpoint", str(load_checkpoint)]
    for key, value in {**model_overrides(), **overrides}.items():
        args += [f"--{key}", str(value)]
    return args


def env():
    environment = dict(os.environ, GLOG_v="3", PYTHONPATH=str(ROOT))
    environment["PATH"] = f"{Path(sys.executable).parent}:{environment['PATH']}"
    return environment


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_python(args, timeout=300, cwd=ROOT, script=ROOT / "run_mindformer.py"):
    """run_mindformer.py (or another script) in a fresh process; returns CompletedProcess (text)."""
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def run_msrun(args, log_dir, workers=2, timeout=400):
    """run_mindformer.py under real msrun workers on this machine (one node)."""
    command = ["msrun", f"--worker_num={workers}", f"--local_worker_num={workers}",
               f"--master_port={free_port()}", f"--log_dir={log_dir}", "--join=True",
               "--cluster_time_out=300", str(ROOT / "run_mindformer.py"), *args, "--use_parallel", "True"]
    result = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    return result


def worker_logs(log_dir):
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(Path(log_dir).glob("*.log")))


def final_weights(output_dir, prefix="llama_tiny"):
    import mindspore as ms
    params = ms.load_checkpoint(str(Path(output_dir) / "checkpoint" / f"{prefix}_final.ckpt"))
    return {k: v.asnumpy() for k, v in params.items()}


def losses(output_dir):
    from mindsft.train.monitor import read_metrics
    return [r["loss"] for r in read_metrics(Path(output_dir) / "metrics.jsonl") if "loss" in r]


def assert_same_run(dir_a, dir_b, loss_tolerance=1e-5, weight_tolerance=2e-5):
    """Two runs logged the same losses and ended with the same weights.

    Weights get 2e-5: Adam divides each gradient by its own running RMS, so a rounding-level
    difference in a near-zero gradient (an embedding row a batch barely touches), which a
    different summation order gives, is amplified. Measured on the tiny config with the fused CPU
    kernels: one of 4096 elements at 1.15e-5, every other weight within 4e-6.
    """
    import numpy as np
    loss_a, loss_b = losses(dir_a), losses(dir_b)
    assert len(loss_a) == len(loss_b) > 0
    np.testing.assert_allclose(loss_a, loss_b, atol=loss_tolerance, rtol=0)
    weights_a, weights_b = final_weights(dir_a), final_weights(dir_b)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        np.testing.assert_allclose(weights_a[name], weights_b[name], atol=weight_tolerance, rtol=0, err_msg=name)


def write_pair_mindrecord(folder, num_records=16, seq_length=TINY_MODEL["seq_length"], vocab_size=128, seed=0,
                          shard_num=1):
    """Preference pairs of seq_length+1 tokens: a shared prompt (labels -100), then a chosen and a
    rejected reply of their own lengths, then padding 0."""
    from mindspore.mindrecord import FileWriter
    from mindsft.data.schema import mindrecord_schema
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    length = seq_length + 1
    rows = []
    for _ in range(num_records):
        prompt = rng.integers(3, vocab_size, int(rng.integers(2, length // 2)))
        prompt[0] = 1
        row = {}
        for side in ("chosen", "rejected"):
            reply = rng.integers(3, vocab_size, int(rng.integers(1, length - len(prompt) + 1)))
            ids = np.zeros(length, np.int32)
            labels = np.full(length, -100, np.int32)
            ids[:len(prompt)] = prompt
            ids[len(prompt):len(prompt) + len(reply)] = reply
            labels[len(prompt):len(prompt) + len(reply)] = reply
            row[f"{side}_input_ids"], row[f"{side}_labels"] = ids, labels
        rows.append(row)
    writer = FileWriter(os.path.join(folder, "train.mindrecord"), shard_num=shard_num, overwrite=True)
    writer.add_schema(mindrecord_schema("pairwise"), "pairwise")
    writer.write_raw_data(rows)
    writer.commit()
    return folder


def checkpoint_meta(output_dir):
    path = Path(output_dir) / "checkpoint" / "rank_0" / "meta.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def kill_after_checkpoint(args, output_dir, min_step):
    """Start run_mindformer.py with `args`, kill -9 it once a checkpoint of step >= `min_step` is
    complete, and return the step of the last complete checkpoint."""
    process = subprocess.Popen([sys.executable, str(ROOT / "run_mindformer.py"), *args], cwd=ROOT, env=env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        meta = checkpoint_meta(output_dir)
        if meta and meta["last_step"] >= min_step:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return checkpoint_meta(output_dir)["last_step"]
