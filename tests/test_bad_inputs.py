"""Malformed inputs to every command line: each gives exit != 0, exactly one line on stderr and
no traceback, and leaves the output path as it was (nothing new, nothing changed, no partial
file beside it).

The tools run in this process (their `main(argv)`, as `python tools/x.py` calls it) with pytest
capturing file descriptors 1 and 2, so MindSpore's C++ log lines would be caught too;
run_mindformer.py runs as its own process, and two cases at the end run the other tools so.
"""
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainkit import ROOT, TINY_YAML, cli_args, env, write_qa_mindrecord, write_start_checkpoint

TOOL_FILES = {"alpaca": "tools/alpaca_converter.py", "preprocess": "tools/llama_preprocess.py",
              "convert": "tools/convert_weight.py", "merge": "tools/merge_lora.py", "run": "run_mindformer.py"}
_loaded = {}


def tool_main(tool):
    if tool not in _loaded:
        spec = importlib.util.spec_from_file_location(f"tool_{tool}", ROOT / TOOL_FILES[tool])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _loaded[tool] = module.main
    return _loaded[tool]


def run_tool(tool, argv):
    try:
        return tool_main(tool)([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


def run_in_subprocess(tool, argv):
    """(exit status, stderr) of the tool's real command line. run_mindformer.py goes this way:
    it selects the device, which MindSpore refuses once an earlier test has run a kernel here."""
    result = subprocess.run([sys.executable, str(ROOT / TOOL_FILES[tool]), *map(str, argv)], cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr


def snapshot(path):
    """What stands at `path` (file bytes' hash or a folder's files) and the names beside it."""
    path = Path(path)
    beside = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else None
    if path.is_file():
        return beside, hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        return beside, sorted((str(p.relative_to(path)), hashlib.sha256(p.read_bytes()).hexdigest())
                              for p in path.rglob("*") if p.is_file())
    return beside, None


# ---------------------------------------------------------------------------------------- inputs

@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_hf_dir):
    """One valid input of every kind; each case copies what it damages."""
    from safetensors.numpy import save_file
    from mindsft.convert import hf_to_ms
    from mindsft.convert.convert import model_config_path
    root = tmp_path_factory.mktemp("good")
    (root / "alpaca.json").write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}]))
    (root / "conv.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"},
                                                                    {"from": "gpt", "value": "hello"}]}]))
    hf_to_ms(tiny_hf_dir, root / "model.ckpt", progress=False, config_path=model_config_path(root / "model.ckpt"))
    adapter = root / "adapter"
    adapter.mkdir()
    rank = 2
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((rank, 64), np.float32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((64, rank), np.float32)},
              str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    write_qa_mindrecord(root / "qa", num_records=8)
    write_start_checkpoint(root / "start.ckpt")
    (root / "run.yaml").write_text("model:\n  model_config:\n    vocab_size: 512\n")
    return {"root": root, "hf": tiny_hf_dir, "tokenizer": tiny_hf_dir / "tokenizer.model",
            "config_json": tiny_hf_dir / "config.json"}


def put(folder, name, content):
    """Write `content` (str, bytes, or a JSON-able value) to folder/name; returns the path."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))
    return path


def flip_byte_in_tensor(ckpt_path, tensor=None):
    """Flip one bit in the middle of a tensor's data (the first tensor, or the named one)."""
    from mindsft.convert.ckpt_format import read_ckpt_entries
    entry = next(e for e in read_ckpt_entries(ckpt_path, verify=False) if tensor in (None, e.name) and e.chunks)
    offset, nbytes = entry.chunks[0]
    with open(ckpt_path, "r+b") as f:
        f.seek(offset + nbytes // 2)
        byte = f.read(1)[0]
        f.seek(offset + nbytes // 2)
        f.write(bytes([byte ^ 0x10]))
    return ckpt_path


DEEP = "[" * 200_000 + "]" * 200_000
GARBAGE = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
LATIN1 = "[{\"instruction\": \"caf\xe9\", \"output\": \"x\"}]".encode("latin-1")


def hf_copy(good, tmp, config=None, weights=None):
    folder = Path(shutil.copytree(good["hf"], tmp / "hf"))
    if config is not None:
        put(folder, "config.json", config)
    if weights is not None:
        put(folder, "model.safetensors", weights)
    return folder


def hf_config_with(good, **changes):
    config = json.loads(Path(good["config_json"]).read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    return config


def adapter_copy(good, tmp, config):
    folder = Path(shutil.copytree(good["root"] / "adapter", tmp / "adapter"))
    put(folder, "adapter_config.json", config)
    return folder


def damaged_copy(good, tmp, name="model.ckpt"):
    return flip_byte_in_tensor(shutil.copy(good["root"] / name, tmp / name))


def busy_folder(tmp, name):
    folder = tmp / name
    put(folder, "notes.txt", "mine")
    return folder


# ----------------------------------------------------------------------------------------- cases
# Each case: (id, tool, builder(good, tmp) -> (argv, output path)).

def alpaca(source):
    def build(good, tmp):
        data = source(good, tmp) if callable(source) else put(tmp, "in.json", source)
        return ["--data_path", data, "--output_path", tmp / "out.json"], tmp / "out.json"
    return build


def preprocess(source=None, model_file=None, output=None, extra=()):
    def build(good, tmp):
        data = (good["root"] / "conv.json" if source is None else source(good, tmp) if callable(source)
                else put(tmp, "in.json", source))
        model = good["tokenizer"] if model_file is None else model_file(good, tmp)
        out = output(tmp) if output else tmp / "out" / "d.mindrecord"
        return ["--input_glob", data, "--model_file", model, "--output_file", out, "--seq_length", 32,
                "--no_progress", *(extra(good, tmp) if callable(extra) else extra)], out
    return build


def convert(config=None, weights=None, output=None, input_path=None):
    def build(good, tmp):
        source = input_path(good, tmp) if input_path else (
            hf_copy(good, tmp, config(good) if callable(config) else config, weights)
            if config is not None or weights is not None else good["hf"])
        out = output(tmp) if output else tmp / "out.ckpt"
        return ["--input_path", source, "--output_path", out, "--no_progress"], out
    return build


def reverse(ckpt=None, config_flag=None, output=None):
    def build(good, tmp):
        source = ckpt(good, tmp) if ckpt else good["root"] / "model.ckpt"
        flag = config_flag(good, tmp) if config_flag else ["--hf_config", good["config_json"]]
        out = output(tmp) if output else tmp / "hf_out"
        return ["--reversed", "--input_path", source, "--output_path", out, *flag, "--no_progress"], out
    return build


def merge(adapter_config=None, base=None, adapter=None, output=None, extra=None):
    def build(good, tmp):
        folder = (adapter(good, tmp) if adapter else adapter_copy(good, tmp, adapter_config)
                  if adapter_config is not None else good["root"] / "adapter")
        base_path = base(good, tmp) if base else good["root"] / "model.ckpt"
        out = output(tmp) if output else tmp / "merged.ckpt"
        flag = "--hf_output" if output and out.name.startswith("hf") else "--output"
        more = extra(good, tmp) if extra else []
        return ["--base", base_path, "--adapter", folder, flag, out, "--no_progress", *more], out
    return build


def run(mode="finetune", dataset=None, checkpoint=None, config=None, extra=None):
    def build(good, tmp):
        data = dataset(good, tmp) if dataset else good["root"] / "qa"
        ckpt = checkpoint(good, tmp) if checkpoint else good["root"] / "start.ckpt"
        out = tmp / "run_out"
        args = cli_args(out, data, ckpt, run_mode=mode)
        if config:
            args[1] = config(good, tmp)
        return args + (extra(good, tmp) if extra else []), out
    return build


def dataset_with(change):
    def build(good, tmp):
        folder = Path(shutil.copytree(good["root"] / "qa", tmp / "qa"))
        change(folder)
        return folder
    return build


def drop_db(folder):
    os.remove(folder / "train.mindrecord1.db")


def summary_beside(content):
    def build(good, tmp):
        folder = tmp / "trained"
        folder.mkdir()
        shutil.copy(good["root"] / "start.ckpt", folder / "llama_tiny_final.ckpt")
        put(folder, "run_summary.json", content)
        return folder / "llama_tiny_final.ckpt"
    return build


CASES = [
    # alpaca_converter: the data file
    ("alpaca-missing", "alpaca", alpaca(lambda good, tmp: tmp / "none.json")),
    ("alpaca-empty", "alpaca", alpaca("")),
    ("alpaca-folder", "alpaca", alpaca(lambda good, tmp: good["root"] / "qa")),
    ("alpaca-garbage", "alpaca", alpaca(GARBAGE)),
    ("alpaca-not-utf8", "alpaca", alpaca(LATIN1)),
    ("alpaca-truncated", "alpaca", alpaca('[{"instruction": "a", "output": "b"}, {"instr')),
    ("alpaca-deep-array", "alpaca", alpaca(DEEP)),
    ("alpaca-deep-jsonl", "alpaca", alpaca("{\"a\": " + DEEP + "}\n")),
    ("alpaca-record-not-object", "alpaca", alpaca([1, 2])),
    ("alpaca-missing-output", "alpaca", alpaca([{"instruction": "a"}])),
    ("alpaca-wrong-type", "alpaca", alpaca([{"instruction": 5, "output": "b"}])),
    ("alpaca-top-level-string", "alpaca", alpaca('"hello"')),
    ("alpaca-bad-jsonl-line", "alpaca", alpaca('{"instruction": "a", "output": "b"}\n{oops}\n')),
    ("alpaca-huge-number", "alpaca", alpaca('[{"instruction": 1e999, "output": "b"}]')),
    ("alpaca-output-is-folder", "alpaca",
     lambda good, tmp: (["--data_path", good["root"] / "alpaca.json", "--output_path", busy_folder(tmp, "o")],
                        tmp / "o")),
    # llama_preprocess: conversations, tokenizer, output
    ("preprocess-no-input", "preprocess", preprocess(source=lambda good, tmp: tmp / "nothing*.json")),
    ("preprocess-empty", "preprocess", preprocess(source="")),
    ("preprocess-garbage", "preprocess", preprocess(source=GARBAGE)),
    ("preprocess-not-utf8", "preprocess", preprocess(source=LATIN1)),
    ("preprocess-deep", "preprocess", preprocess(source=DEEP)),
    ("preprocess-records-are-numbers", "preprocess", preprocess(source=[1, 2, 3])),
    ("preprocess-turn-wrong-type", "preprocess", preprocess(source=[{"conversations": [7]}])),
    ("preprocess-tokenizer-missing", "preprocess", preprocess(model_file=lambda good, tmp: tmp / "none.model")),
    ("preprocess-tokenizer-garbage", "preprocess", preprocess(model_file=lambda good, tmp: put(tmp, "t.model", GARBAGE))),
    ("preprocess-tokenizer-folder", "preprocess", preprocess(model_file=lambda good, tmp: good["root"] / "qa")),
    ("preprocess-output-is-folder", "preprocess", preprocess(output=lambda tmp: busy_folder(tmp, "o.mindrecord"))),
    ("preprocess-hf-template-truncated", "preprocess",
     preprocess(extra=lambda good, tmp: ["--template", "hf", "--tokenizer_config", put(tmp, "tc.json", '{"chat_')])),
    ("preprocess-hf-template-not-object", "preprocess",
     preprocess(extra=lambda good, tmp: ["--template", "hf", "--tokenizer_config", put(tmp, "tc.json", [1])])),
    ("preprocess-seq-length-zero", "preprocess", preprocess(extra=["--seq_length", "0"])),
    ("preprocess-partition-zero", "preprocess", preprocess(extra=["--file_partition", "0"])),
    # convert_weight, HuggingFace -> ckpt: config.json and weights
    ("convert-config-missing-key", "convert", convert(config=lambda good: hf_config_with(good, hidden_size=None))),
    ("convert-config-wrong-type", "convert", convert(config=lambda good: hf_config_with(good, hidden_size="big"))),
    ("convert-config-bool-size", "convert", convert(config=lambda good: hf_config_with(good, num_hidden_layers=True))),
    ("convert-config-negative", "convert", convert(config=lambda good: hf_config_with(good, num_hidden_layers=-2))),
    ("convert-config-not-object", "convert", convert(config=[1, 2])),
    ("convert-config-truncated", "convert", convert(config='{"hidden_size": 6')),
    ("convert-config-not-utf8", "convert", convert(config=b'{"model_type": "\xff"}')),
    ("convert-config-deep", "convert", convert(config='{"a": ' + DEEP + "}")),
    ("convert-config-huge-vocab", "convert", convert(config=lambda good: hf_config_with(good, vocab_size=10**12))),
    ("convert-config-archs-not-list", "convert", convert(config=lambda good: hf_config_with(good, architectures=5))),
    ("convert-weights-garbage", "convert", convert(weights=GARBAGE)),
    ("convert-weights-empty", "convert", convert(weights=b"")),
    ("convert-output-is-folder", "convert", convert(output=lambda tmp: busy_folder(tmp, "out.ckpt"))),
    ("convert-index-without-map", "convert",
     convert(input_path=lambda good, tmp: shutil.copy(good["config_json"], tmp) and
             put(tmp, "m.safetensors.index.json", {"metadata": {}}))),
    ("convert-input-wrong-suffix", "convert", convert(input_path=lambda good, tmp: put(tmp, "weights.txt", "x"))),
    # convert_weight --reversed: the checkpoint, the config, the output folder
    ("reverse-yaml-unparsable", "convert",
     reverse(config_flag=lambda good, tmp: ["--config", put(tmp, "r.yaml", "model: [unclosed\n  x: {")])),
    ("reverse-yaml-a-list", "convert", reverse(config_flag=lambda good, tmp: ["--config", put(tmp, "r.yaml", "- 1\n")])),
    ("reverse-yaml-no-model-config", "convert",  # and no X.config.json travels with this checkpoint
     reverse(ckpt=lambda good, tmp: shutil.copy(good["root"] / "model.ckpt", tmp / "alone.ckpt"),
             config_flag=lambda good, tmp: ["--config", put(tmp, "r.yaml", "model: {}\n")])),
    ("reverse-yaml-not-utf8", "convert",
     reverse(config_flag=lambda good, tmp: ["--config", put(tmp, "r.yaml", b"model: \xff\xfe\n")])),
    ("reverse-hf-config-missing-key", "convert",
     reverse(config_flag=lambda good, tmp: ["--hf_config", put(tmp, "c.json", hf_config_with(good, vocab_size=None))])),
    ("reverse-ckpt-damaged", "convert", reverse(ckpt=lambda good, tmp: damaged_copy(good, tmp))),
    ("reverse-ckpt-truncated", "convert",
     reverse(ckpt=lambda good, tmp: put(tmp, "t.ckpt", (good["root"] / "model.ckpt").read_bytes()[:5000]))),
    ("reverse-ckpt-garbage", "convert", reverse(ckpt=lambda good, tmp: put(tmp, "g.ckpt", GARBAGE))),
    ("reverse-ckpt-empty", "convert", reverse(ckpt=lambda good, tmp: put(tmp, "e.ckpt", b""))),
    ("reverse-output-not-empty", "convert", reverse(output=lambda tmp: busy_folder(tmp, "hf_out"))),
    ("reverse-output-is-file", "convert", reverse(output=lambda tmp: put(tmp, "hf_out", "a file"))),
    # merge_lora: adapter_config.json, YAML, base, outputs
    ("merge-adapter-config-missing-r", "merge", merge(adapter_config={"peft_type": "LORA", "lora_alpha": 4})),
    ("merge-adapter-config-r-string", "merge", merge(adapter_config={"r": "eight", "lora_alpha": 4})),
    ("merge-adapter-config-alpha-string", "merge", merge(adapter_config={"r": 2, "lora_alpha": "four"})),
    ("merge-adapter-config-not-object", "merge", merge(adapter_config=[2, 4])),
    ("merge-adapter-config-truncated", "merge", merge(adapter_config='{"r": 2, "lora_al')),
    ("merge-adapter-config-targets-number", "merge",
     merge(adapter_config={"r": 2, "lora_alpha": 4, "target_modules": 3})),
    ("merge-adapter-weights-garbage", "merge",
     merge(adapter=lambda good, tmp: put(Path(shutil.copytree(good["root"] / "adapter", tmp / "a")),
                                         "adapter_model.safetensors", GARBAGE).parent)),
    ("merge-yaml-unparsable", "merge",
     merge(extra=lambda good, tmp: ["--config", put(tmp, "m.yaml", "model:\n\t- bad: [")])),
    ("merge-base-damaged", "merge", merge(base=lambda good, tmp: damaged_copy(good, tmp))),
    ("merge-output-is-folder", "merge", merge(output=lambda tmp: busy_folder(tmp, "merged.ckpt"))),
    ("merge-hf-output-not-empty", "merge",
     merge(output=lambda tmp: busy_folder(tmp, "hf_merged"), extra=lambda good, tmp: ["--config", good["root"] / "run.yaml"])),
    # run_mindformer.py: the YAML, the dataset folder, the checkpoints
    ("run-yaml-unparsable", "run", run(config=lambda good, tmp: put(tmp, "c.yaml", "runner_config: {epochs: [1,\n"))),
    ("run-yaml-not-utf8", "run", run(config=lambda good, tmp: put(tmp, "c.yaml", b"seed: \xff\n"))),
    ("run-yaml-a-list", "run", run(config=lambda good, tmp: put(tmp, "c.yaml", "- a\n- b\n"))),
    ("run-dataset-junk-mindrecord", "run",
     run(dataset=dataset_with(lambda folder: put(folder, "train.mindrecord0", GARBAGE)))),
    ("run-dataset-shard-without-db", "run", run(dataset=dataset_with(drop_db))),
    ("run-dataset-stats-truncated", "run",
     run(dataset=dataset_with(lambda folder: put(folder, "train.mindrecord.stats.json", '{"template": "vic')))),
    ("run-checkpoint-damaged", "run", run(checkpoint=lambda good, tmp: damaged_copy(good, tmp, "start.ckpt"))),
    ("run-checkpoint-garbage", "run", run(checkpoint=lambda good, tmp: put(tmp, "g.ckpt", GARBAGE))),
    ("run-eval-checkpoint-damaged", "run",
     run(mode="eval", checkpoint=lambda good, tmp: damaged_copy(good, tmp, "start.ckpt"),
         extra=lambda good, tmp: ["--eval_dataset_dir", good["root"] / "qa"])),
    ("run-predict-summary-truncated", "run",
     run(mode="predict", checkpoint=summary_beside('{"template": "vicu'),
         extra=lambda good, tmp: ["--predict_data", "hello", "--processor.tokenizer.vocab_file", good["tokenizer"]])),
]


def test_the_table_covers_every_tool_with_at_least_60_cases():
    assert len(CASES) >= 60
    assert {tool for _, tool, _ in CASES} == set(TOOL_FILES)
    assert len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("tool, build", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_gives_one_line_and_leaves_the_output_alone(tool, build, good, tmp_path, capfd):
    argv, output = build(good, tmp_path)
    before = snapshot(output)
    if tool == "run":
        code, err = run_in_subprocess(tool, argv)
    else:
        capfd.readouterr()
        code = run_tool(tool, argv)
        _, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert snapshot(output) == before


@pytest.mark.parametrize("tool, argv", [
    ("alpaca", ["--data_path", "{good}/alpaca.json", "--output_path", "{busy}"]),
    ("run", ["--config", str(TINY_YAML), "--train_dataset_dir", "{junk}", "--load_checkpoint", "{good}/start.ckpt",
             "--output_dir", "{tmp}/out"]),
])
def test_the_command_lines_themselves_print_one_line(tool, argv, good, tmp_path):
    busy = busy_folder(tmp_path, "busy")
    junk = tmp_path / "junk"
    put(junk, "train.mindrecord", GARBAGE)
    put(junk, "train.mindrecord.db", GARBAGE)
    argv = [a.format(good=good["root"], busy=busy, junk=junk, tmp=tmp_path) for a in argv]
    result = subprocess.run([sys.executable, str(ROOT / TOOL_FILES[tool]), *argv], cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (busy / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists()
