"""The validation split of llama_preprocess (--val_size): the eval records are those
`datasets.train_test_split` sets aside for the same seed, train and eval are disjoint and cover
every record, the split does not depend on the worker count, and training with do_eval finds
the eval records on its own."""
import json

import pytest

from mindsft.data.alpaca import convert_alpaca
from mindsft.data.mindrecord import read_mindrecord
from mindsft.data.preprocess import PreprocessOptions, preprocess, stats_path
from mindsft.data.split import eval_count, recorded_eval_dataset_dir, split_positions
from mindsft.errors import ConfigError
from mindsft.demo_model import SAMPLE_ALPACA, sample_texts, train_tokenizer


@pytest.mark.parametrize("val_size, seed", [(0.1, 42), (0.25, 0), (7, 3), (30, 42)])
def test_eval_records_are_those_train_test_split_sets_aside(val_size, seed):
    datasets = pytest.importorskip("datasets", reason="the reference for the split: pip install datasets")
    keys = [("f.json", i) for i in range(75)]
    train, evaluation = split_positions(keys, val_size, seed)
    table = datasets.Dataset.from_dict({"position": list(range(75))})
    expected = table.train_test_split(test_size=int(val_size) if val_size > 1 else val_size, seed=seed)
    assert evaluation == sorted(expected["test"]["position"])
    assert train == sorted(expected["train"]["position"])


def test_every_copy_of_a_record_goes_to_the_same_side():
    keys = ["a", "b", "a", "c", "b", "c", "d"]
    for seed in range(10):
        train, evaluation = split_positions(keys, 0.25, seed)   # one of the 4 distinct records
        assert {keys[p] for p in train}.isdisjoint(keys[p] for p in evaluation)
        assert len({keys[p] for p in evaluation}) == 1 and sorted(train + evaluation) == list(range(7))


def test_val_size_that_leaves_nothing_to_train_on_is_refused():
    assert eval_count(0.2, 10) == 2 and eval_count(3, 10) == 3
    for bad in (0, 1, 10, 2.5, -0.1):
        with pytest.raises(ConfigError, match="val_size"):
            eval_count(bad, 10)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("split")
    model_file = train_tokenizer(sample_texts(), str(folder / "tokenizer.model"))
    convert_alpaca(SAMPLE_ALPACA, folder / "conv.json")
    return folder, model_file


def run(folder, model_file, output, **kwargs):
    options = PreprocessOptions(input_glob=str(folder / "conv.json"), model_file=model_file,
                                output_file=str(output), progress=False, command_line=["test"],
                                **{"seq_length": 256, **kwargs})
    return preprocess(options)


def rows(path):
    return [tuple(r["input_ids"].tolist()) + tuple(r["labels"].tolist()) for r in read_mindrecord(path)]


def test_train_and_eval_outputs_are_disjoint_cover_every_record_and_ignore_workers(sample, tmp_path, monkeypatch):
    folder, model_file = sample
    import mindsft.data.preprocess
    monkeypatch.setattr(mindsft.data.preprocess, "CHUNK_RECORDS", 8)  # many chunks, out-of-order finishes
    everything = run(folder, model_file, tmp_path / "all/d.mindrecord")
    assert everything["records_written"] == 75
    stats = run(folder, model_file, tmp_path / "w1/d.mindrecord", val_size=0.2, seed=5)
    run(folder, model_file, tmp_path / "w2/d.mindrecord", val_size=0.2, seed=5, num_workers=2)
    train, evaluation = rows(tmp_path / "w1/d.mindrecord"), rows(tmp_path / "w1/eval/d.mindrecord")
    # The sample holds 73 distinct records (two twice): 15 of them (20%) are set aside.
    assert len(set(evaluation)) == 15 and len(train) + len(evaluation) == 75
    assert sorted(train + evaluation) == sorted(rows(tmp_path / "all/d.mindrecord"))
    assert set(train).isdisjoint(evaluation)
    for name in ("d.mindrecord", "eval/d.mindrecord"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    assert stats["split"] == "train" and stats["eval_dataset_dir"] == "eval"
    eval_stats = json.loads(open(stats_path(tmp_path / "w1/eval/d.mindrecord")).read())
    assert eval_stats["split"] == "eval" and eval_stats["records_written"] == len(evaluation)
    # Another seed sets other records aside.
    run(folder, model_file, tmp_path / "s6/d.mindrecord", val_size=0.2, seed=6)
    assert set(rows(tmp_path / "s6/eval/d.mindrecord")) != set(evaluation)


def test_repeat_applies_to_train_only(sample, tmp_path):
    folder, model_file = sample
    stats = run(folder, model_file, tmp_path / "d.mindrecord", val_size=5, repeat=2)
    assert stats["records_written"] == 140
    assert len(rows(tmp_path / "eval/d.mindrecord")) == 5


def test_training_with_do_eval_reads_the_recorded_eval_split(sample, tmp_path):
    from trainkit import TINY_YAML, model_overrides, run_python, write_start_checkpoint
    from mindsft.tokenizer import LlamaTokenizer
    from mindsft.train.monitor import read_metrics
    folder, model_file = sample
    run(folder, model_file, tmp_path / "data/train/d.mindrecord", seq_length=64, val_size=8, template="raw")
    assert recorded_eval_dataset_dir(tmp_path / "data/train") == str(tmp_path / "data/train/eval")
    vocab_size = LlamaTokenizer(model_file).vocab_size
    write_start_checkpoint(tmp_path / "start.ckpt", vocab_size=vocab_size)
    args = ["--config", str(TINY_YAML), "--output_dir", str(tmp_path / "out"),
            "--train_dataset_dir", str(tmp_path / "data/train"), "--load_checkpoint", str(tmp_path / "start.ckpt"),
            "--do_eval", "True"]
    for key, value in {**model_overrides(vocab_size=vocab_size, seq_length=64), "runner_config.epochs": 1,
                       "runner_config.batch_size": 4, "eval_step_interval": 5}.items():
        args += [f"--{key}", str(value)]
    result = run_python(args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evaluated = [row for row in read_metrics(tmp_path / "out/metrics.jsonl") if "eval_loss" in row]
    assert evaluated and all(row["eval_loss"] > 0 for row in evaluated)
