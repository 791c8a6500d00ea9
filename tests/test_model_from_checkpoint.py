"""The checkpoint carries its model: a converted `.ckpt` has its config beside it, so a run YAML
that gives no model shape trains and predicts; a wrong model setting is named with the likely
fix; a misspelt key in any section fails at load, before any work."""
import json
import subprocess
import sys

import pytest
import yaml

from mindsft.config import load_run_config
from mindsft.errors import ConfigError
from trainkit import ROOT, TINY_YAML, env, run_python, write_qa_mindrecord

SHAPE_KEYS = ("hidden_size", "num_layers", "num_heads", "n_kv_heads", "intermediate_size", "vocab_size")


@pytest.fixture(scope="module")
def converted(tiny_hf_dir, tmp_path_factory):
    """tools/convert_weight.py's output: model.ckpt and model.config.json beside it."""
    root = tmp_path_factory.mktemp("carried")
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_weight.py"), "--input_path", str(tiny_hf_dir),
                    "--output_path", str(root / "model.ckpt"), "--no_progress"], env=env(), cwd=ROOT, check=True)
    return root / "model.ckpt"


def shapeless_yaml(path, seq_length=32):
    raw = yaml.safe_load(TINY_YAML.read_text())
    model_config = raw["model"]["model_config"]
    for key in SHAPE_KEYS:
        model_config.pop(key)
    model_config["seq_length"] = seq_length
    path.write_text(yaml.safe_dump(raw))
    return path


def test_converter_writes_the_model_config_beside_the_checkpoint(converted, tiny_hf_dir):
    written = json.loads(converted.with_name("model.config.json").read_text())
    source = json.loads((tiny_hf_dir / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "tie_word_embeddings"):
        assert written[key] == source[key], key


def test_a_yaml_without_a_model_shape_takes_it_from_the_checkpoint(converted, tmp_path):
    config = load_run_config(shapeless_yaml(tmp_path / "run.yaml"), {"load_checkpoint": str(converted)})
    assert (config.model_config.hidden_size, config.model_config.num_layers, config.model_config.n_kv_heads) == \
        (64, 2, 2)
    assert config.model_config.seq_length == 32      # the YAML's settings win over the checkpoint's


def test_a_yaml_without_a_shape_and_no_config_is_refused_naming_the_keys(tmp_path):
    with pytest.raises(ConfigError, match="gives no vocab_size, hidden_size, num_layers, num_heads"):
        load_run_config(shapeless_yaml(tmp_path / "run.yaml"), {"load_checkpoint": str(tmp_path / "none.ckpt")})


@pytest.mark.slow
def test_run_from_a_converted_checkpoint_with_no_model_shape_trains_and_predicts(converted, tiny_hf_dir, tmp_path):
    yaml_path = shapeless_yaml(tmp_path / "run.yaml")
    write_qa_mindrecord(tmp_path / "qa", num_records=8, seq_length=32, vocab_size=512)
    out = tmp_path / "out"
    trained = run_python(["--config", str(yaml_path), "--load_checkpoint", str(converted), "--output_dir", str(out),
                          "--train_dataset_dir", str(tmp_path / "qa"), "--runner_config.batch_size", "4"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    final = out / "checkpoint" / "llama_tiny_final.ckpt"
    assert final.with_name("llama_tiny_final.config.json").is_file()
    predicted = run_python(["--config", str(yaml_path), "--run_mode", "predict", "--load_checkpoint", str(final),
                            "--processor.tokenizer.vocab_file", str(tiny_hf_dir / "tokenizer.model"),
                            "--predict_data", "Name a colour.", "--max_new_tokens", "4",
                            "--output_dir", str(tmp_path / "predict")])
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert len((tmp_path / "predict" / "generated_predictions.jsonl").read_text().splitlines()) == 1


def test_a_wrong_tie_word_embeddings_gives_the_one_line_hint(converted, tmp_path):
    write_qa_mindrecord(tmp_path / "qa", num_records=4, seq_length=32, vocab_size=512)
    result = run_python(["--config", str(shapeless_yaml(tmp_path / "run.yaml")), "--run_mode", "eval",
                         "--load_checkpoint", str(converted), "--eval_dataset_dir", str(tmp_path / "qa"),
                         "--model.model_config.tie_word_embeddings", "True", "--output_dir", str(tmp_path / "out")])
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "lm_head.weight" in lines[0] and "set tie_word_embeddings: False" in lines[0]


MISSPELT = [
    ("top level", {"seeds": 1}, "seed"),
    ("runner_config", {"runner_config": {"epoch": 1}}, "epochs"),
    ("optimizer", {"optimizer": {"learning_rat": 1e-4}}, "learning_rate"),
    ("lr_schedule", {"lr_schedule": {"warmup_ratioo": 0.1}}, "warmup_ratio"),
    ("train_dataset", {"train_dataset": {"data_loader": {"dataset_dirr": "x"}}}, "dataset_dir"),
    ("model_config", {"model": {"model_config": {"num_layer": 2}}}, "num_layers"),
    ("pet_config", {"model": {"model_config": {"pet_config": {"pet_type": "lora", "lora_rnak": 8}}}}, "lora_rank"),
    ("generation_config", {"generation_config": {"max_new_token": 8}}, "max_new_tokens"),
    ("context", {"context": {"device_targt": "CPU"}}, "device_target"),
    ("parallel_config", {"parallel_config": {"data_paralel": 1}}, "data_parallel"),
    ("processor.tokenizer", {"processor": {"tokenizer": {"vocab_fil": "t.model"}}}, "vocab_file"),
    ("callbacks", {"callbacks": [{"type": "CheckpointMonitor", "save_checkpoint_step": 3}]}, "save_checkpoint_steps"),
]


def merged(base, extra):
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged(base[key], value)
        else:
            base[key] = value
    return base


@pytest.mark.parametrize("section, extra, nearest", MISSPELT, ids=[m[0] for m in MISSPELT])
def test_a_misspelt_key_in_any_section_fails_at_load_naming_the_nearest(section, extra, nearest, tmp_path):
    raw = merged(yaml.safe_load(TINY_YAML.read_text()), extra)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=f"did you mean '{nearest}'"):
        load_run_config(tmp_path / "run.yaml")


def test_pretrained_model_dir_gives_the_model_its_config_and_weights(converted, tiny_hf_dir, tmp_path):
    """MindFormers 1.5's HF folder start: the same logits as the converted checkpoint gives."""
    import mindspore as ms
    import numpy as np
    from mindsft.loading import build_model, load_start_weights
    from_folder = load_run_config(shapeless_yaml(tmp_path / "run.yaml"), {"pretrained_model_dir": str(tiny_hf_dir)})
    from_ckpt = load_run_config(shapeless_yaml(tmp_path / "run.yaml"), {"load_checkpoint": str(converted)})
    assert from_folder.model_config == from_ckpt.model_config
    logits = []
    for config in (from_folder, from_ckpt):
        model = build_model(config)
        load_start_weights(model, config)
        logits.append(model(ms.Tensor(np.arange(1, 9, dtype=np.int32).reshape(1, 8))).asnumpy())
    np.testing.assert_array_equal(logits[0], logits[1])


def test_model_settings_on_the_command_line_are_typed_at_load():
    """YAML 1.1 reads 1e-6 (no dot) as a string: it still reaches the model as a float; a word
    where a number belongs is named at load instead of failing inside the model."""
    config = load_run_config(TINY_YAML, {"model.model_config.rms_norm_eps": "1e-6"})
    assert config.model_config.rms_norm_eps == 1e-6
    with pytest.raises(ConfigError, match="model.model_config.num_layers: expected an integer, got 'two'"):
        load_run_config(TINY_YAML, {"model.model_config.num_layers": "two"})
