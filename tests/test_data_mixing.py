"""Mixing several instruction datasets in llama_preprocess: interleaving orders records as
`datasets.interleave_datasets` does for the same seed and probabilities, concat keeps each source's
order, max_samples takes a source's first records, and the stats JSON counts each source."""
import json

import numpy as np
import pytest

from mindsft.data.alpaca import convert_alpaca
from mindsft.data.mindrecord import read_mindrecord
from mindsft.data.mixing import Source, mix_order, read_manifest
from mindsft.data.preprocess import PreprocessOptions, preprocess
from mindsft.errors import ConfigError
from mindsft.demo_model import SAMPLE_ALPACA, sample_texts, train_tokenizer

datasets = pytest.importorskip("datasets", reason="the reference for interleaving: pip install datasets")


def reference_order(lengths, strategy, probabilities, seed):
    """(source, index) rows of datasets.interleave_datasets over sources of `lengths` rows."""
    parts = [datasets.Dataset.from_dict({"source": [s] * n, "index": list(range(n))})
             for s, n in enumerate(lengths)]
    stopping = {"interleave_under": "first_exhausted", "interleave_over": "all_exhausted"}[strategy]
    mixed = datasets.interleave_datasets(parts, probabilities=probabilities, seed=seed, stopping_strategy=stopping)
    return list(zip(mixed["source"], mixed["index"]))


@pytest.mark.parametrize("strategy", ["interleave_under", "interleave_over"])
@pytest.mark.parametrize("lengths, probabilities, seed", [
    ((50, 25), [0.7, 0.3], 42),
    ((3, 400, 40), [0.2, 0.5, 0.3], 0),
    ((1200, 900), [0.5, 0.5], 7),        # longer than one block of 1000 draws
    ((30, 30, 30), None, 42),            # no weights: round robin
    ((10, 80), [0.0, 1.0], 1),           # a source of weight 0 is never drawn (under only)
])
def test_interleaving_orders_records_as_datasets_interleave_datasets(strategy, lengths, probabilities, seed):
    if strategy == "interleave_over" and probabilities and 0.0 in probabilities:
        with pytest.raises(ConfigError, match="weight 0"):
            mix_order(lengths, strategy, probabilities, seed)
        return
    expected = reference_order(lengths, strategy, probabilities, seed)
    got = mix_order(lengths, strategy, probabilities, seed)
    assert got == expected
    counts = np.bincount([s for s, _ in got], minlength=len(lengths))
    if strategy == "interleave_under":
        assert (counts <= lengths).all()
    else:
        assert (counts >= lengths).all()


def test_concat_keeps_every_source_in_its_order():
    assert mix_order([3, 2], "concat") == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The built-in sample split into a JSON array (50 records) and a JSON Lines file (25)."""
    folder = tmp_path_factory.mktemp("mix")
    model_file = train_tokenizer(sample_texts(), str(folder / "tokenizer.model"))
    convert_alpaca(SAMPLE_ALPACA, folder / "conv.json")
    conversations = json.loads((folder / "conv.json").read_text(encoding="utf-8"))
    (folder / "a.json").write_text(json.dumps(conversations[:50]), encoding="utf-8")
    (folder / "b.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conversations[50:]), encoding="utf-8")
    return folder, model_file


def run(folder, model_file, output, **kwargs):
    options = PreprocessOptions(model_file=model_file, output_file=str(output), progress=False,
                                command_line=["test"], **{"seq_length": 256, **kwargs})
    return preprocess(options)


def rows(path):
    return [tuple(r["input_ids"].tolist()) for r in read_mindrecord(path)]


@pytest.fixture(scope="module")
def alone(sources, tmp_path_factory):
    """The records of each source preprocessed on its own: what the mixes are made of."""
    folder, model_file = sources
    out = tmp_path_factory.mktemp("alone")
    run(folder, model_file, out / "a/d.mindrecord", input_glob=str(folder / "a.json"))
    run(folder, model_file, out / "b/d.mindrecord", input_glob=str(folder / "b.jsonl"))
    return [rows(out / "a/d.mindrecord"), rows(out / "b/d.mindrecord")]


def test_concat_writes_the_sources_one_after_the_other(sources, alone, tmp_path):
    folder, model_file = sources
    stats = run(folder, model_file, tmp_path / "d.mindrecord", input_glob=[str(folder / "a.json"),
                                                                            str(folder / "b.jsonl")])
    assert rows(tmp_path / "d.mindrecord") == alone[0] + alone[1]
    assert [(s["records_read"], s["records_written"]) for s in stats["sources"]] == [(50, 50), (25, 25)]


@pytest.mark.parametrize("strategy", ["interleave_under", "interleave_over"])
def test_interleaved_output_follows_the_mix_and_counts_each_source(sources, alone, tmp_path, strategy):
    folder, model_file = sources
    stats = run(folder, model_file, tmp_path / "d.mindrecord", input_glob=[str(folder / "a.json"),
                str(folder / "b.jsonl")], mix_weights=[0.7, 0.3], mix_strategy=strategy, seed=3)
    expected_order = reference_order([50, 25], strategy, [0.7, 0.3], seed=3)
    assert rows(tmp_path / "d.mindrecord") == [alone[s][i] for s, i in expected_order]
    counts = np.bincount([s for s, _ in expected_order]).tolist()
    assert [s["records_written"] for s in stats["sources"]] == counts
    assert [s["records_read"] for s in stats["sources"]] == [50, 25]
    assert [s["probability"] for s in stats["sources"]] == [0.7, 0.3]
    assert stats["records_written"] == len(expected_order) and stats["mix_strategy"] == strategy


def test_max_samples_takes_the_first_records_of_each_source(sources, alone, tmp_path):
    folder, model_file = sources
    stats = run(folder, model_file, tmp_path / "d.mindrecord", input_glob=[str(folder / "a.json"),
                str(folder / "b.jsonl")], max_samples=10)
    assert rows(tmp_path / "d.mindrecord") == alone[0][:10] + alone[1][:10]
    assert [(s["records_read"], s["records_taken"]) for s in stats["sources"]] == [(50, 10), (25, 10)]


def test_a_yaml_manifest_gives_the_same_mix_as_the_flags(sources, tmp_path):
    folder, model_file = sources
    manifest = tmp_path / "mix.yaml"
    manifest.write_text(f"mix_strategy: interleave_under\nsources:\n"
                        f"  - {{path: {folder / 'a.json'}, weight: 2, max_samples: 40}}\n"
                        f"  - {{path: {folder / 'b.jsonl'}, weight: 1}}\n", encoding="utf-8")
    listed, strategy = read_manifest(manifest)
    assert strategy == "interleave_under"
    assert listed == [Source(str(folder / "a.json"), 2, 40), Source(str(folder / "b.jsonl"), 1, None)]
    from tools.llama_preprocess import main
    assert main(["--mix_manifest", str(manifest), "--model_file", model_file, "--seq_length", "256",
                 "--output_file", str(tmp_path / "m/d.mindrecord"), "--no_progress"]) == 0
    run(folder, model_file, tmp_path / "f/d.mindrecord", input_glob=None, sources=[Source(str(folder / "a.json"), 2, 40),
        Source(str(folder / "b.jsonl"), 1)], mix_strategy="interleave_under")
    assert rows(tmp_path / "m/d.mindrecord") == rows(tmp_path / "f/d.mindrecord")
    assert len(rows(tmp_path / "m/d.mindrecord")) < 65   # weights 2:1 scaled, stopped when b ran out


def test_mistakes_in_the_mix_are_one_clear_line(sources, tmp_path, capsys):
    folder, model_file = sources
    from tools.llama_preprocess import main
    code = main(["--input_glob", str(folder / "a.json"), str(folder / "b.jsonl"), "--mix_weights", "1",
                 "--mix_strategy", "interleave_under", "--model_file", model_file,
                 "--output_file", str(tmp_path / "d.mindrecord"), "--no_progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "--mix_weights gives 1 weight(s) for 2 --input_glob source(s)" in err
    with pytest.raises(ConfigError, match="a.json is in mix sources 0 and 1"):
        run(folder, model_file, tmp_path / "d.mindrecord", input_glob=[str(folder / "a.json"), str(folder / "*.json")])
    assert not (tmp_path / "d.mindrecord").exists()
