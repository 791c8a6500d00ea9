"""The run config: MindFormers' YAML keys, typed once, with overrides and clear errors."""
import pytest
import yaml

from mindsft.config import load_run_config
from mindsft.errors import ConfigError
from trainkit import TINY_YAML, ROOT

import run_mindformer


def write_yaml(tmp_path, change):
    raw = yaml.safe_load(TINY_YAML.read_text())
    change(raw)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_configs_parse_into_typed_objects():
    for name in ("finetune_llama_tiny_cpu", "finetune_llama2_7b", "pretrain_llama2_7b", "finetune_llama2_13b"):
        config = load_run_config(ROOT / "configs" / "llama2" / f"{name}.yaml")
        assert isinstance(config.optimizer.learning_rate, float)
        assert config.model_config.num_layers >= 2
    big = load_run_config(ROOT / "configs" / "llama2" / "finetune_llama2_7b.yaml")
    assert (big.model_config.hidden_size, big.model_config.intermediate_size) == (4096, 11008)
    assert big.callbacks.checkpoint.prefix == "llama2_7b" and big.parallel_config.data_parallel == 8
    assert big.runner_wrapper.scale_sense.loss_scale_value == 65536


def test_unknown_key_names_the_nearest_known_key(tmp_path):
    path = write_yaml(tmp_path, lambda raw: raw["optimizer"].update(learning_rat=1e-4))
    with pytest.raises(ConfigError, match=r"optimizer\.learning_rat.*did you mean 'learning_rate'"):
        load_run_config(path)
    path = write_yaml(tmp_path, lambda raw: raw.update(runner_confg={"epochs": 1}))
    with pytest.raises(ConfigError, match="did you mean 'runner_config'"):
        load_run_config(path)


def test_unknown_model_key_and_callback_type_are_errors(tmp_path):
    path = write_yaml(tmp_path, lambda raw: raw["model"]["model_config"].update(num_layer=3))
    with pytest.raises(ConfigError, match="did you mean 'num_layers'"):
        load_run_config(path)
    path = write_yaml(tmp_path, lambda raw: raw["callbacks"].append({"type": "CheckpointMonitr"}))
    with pytest.raises(ConfigError, match="did you mean 'CheckpointMonitor'"):
        load_run_config(path)


def test_dotted_overrides_set_typed_values():
    config = load_run_config(TINY_YAML, {"optimizer.learning_rate": "1e-5", "runner_config.epochs": "7",
                                         "use_parallel": "True", "callbacks.1.save_checkpoint_steps": "3",
                                         "model.model_config.num_layers": "3"})
    assert config.optimizer.learning_rate == 1e-5 and config.runner_config.epochs == 7
    assert config.use_parallel is True and config.callbacks.checkpoint.save_checkpoint_steps == 3
    assert config.model_config.num_layers == 3


def test_override_of_a_missing_intermediate_key_is_an_error():
    with pytest.raises(ConfigError, match="no key 'optimizr'.*did you mean 'optimizer'"):
        load_run_config(TINY_YAML, {"optimizr.learning_rate": "1"})


def test_wrong_types_name_the_key():
    with pytest.raises(ConfigError, match="runner_config.epochs: expected an integer"):
        load_run_config(TINY_YAML, {"runner_config.epochs": "two"})
    with pytest.raises(ConfigError, match="use_parallel: expected True or False"):
        load_run_config(TINY_YAML, {"use_parallel": "maybe"})
    with pytest.raises(ConfigError, match="lr_schedule.type 'Cosine'"):
        load_run_config(TINY_YAML, {"lr_schedule.type": "Cosine"})


def test_command_line_flags_map_to_mindformers_keys():
    path, overrides = run_mindformer.parse_args(
        ["--config", "x.yaml", "--train_dataset_dir", "d", "--epochs", "3", "--batch_size", "4",
         "--gradient_accumulation_steps", "2", "--device_target", "CPU", "--optimizer.learning_rate", "1e-5",
         "--options", "seed=5"])
    assert path == "x.yaml"
    assert overrides == {"train_dataset.data_loader.dataset_dir": "d", "runner_config.epochs": "3",
                         "runner_config.batch_size": "4", "runner_config.gradient_accumulation_steps": "2",
                         "context.device_target": "CPU", "optimizer.learning_rate": "1e-5", "seed": "5"}


def test_lr_schedules_follow_mindformers_formulas():
    import math
    from mindsft.config import LrScheduleConfig
    from mindsft.train.schedule import build_lr_schedule
    cosine = build_lr_schedule(LrScheduleConfig(type="CosineWithWarmUpLR", warmup_steps=10, lr_end=0.0), 1e-3, 110)
    assert cosine(0) == 0.0 and cosine(5) == pytest.approx(5e-4) and cosine(10) == pytest.approx(1e-3)
    assert cosine(60) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine(110) == pytest.approx(0.0, abs=1e-12)
    linear = build_lr_schedule(LrScheduleConfig(type="LinearWithWarmUpLR", warmup_ratio=0.1, lr_end=1e-4), 1e-3, 100)
    assert linear(55) == pytest.approx(1e-4 + 9e-4 * 0.5)
    constant = build_lr_schedule(LrScheduleConfig(type="constant"), 2e-5, 10)
    assert constant(0) == constant(9) == 2e-5


def test_context_keys_of_the_yaml_reach_mindspore():
    from mindsft.train.context import mindspore_context_settings
    ascend = load_run_config(ROOT / "configs/llama2/finetune_llama2_7b.yaml")
    assert mindspore_context_settings(ascend.context) == {
        "max_device_memory": "58GB", "jit_config": {"jit_level": "O1"}, "memory_optimize_level": "O0"}
    tiny = load_run_config(TINY_YAML, {"context.runtime_num_threads": "1"})
    assert mindspore_context_settings(tiny.context) == {"runtime_num_threads": 1}
