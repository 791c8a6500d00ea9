"""Packing in preprocessing: every sample once, in rows that hold it whole, with its boundaries."""
import json

import numpy as np
import pytest

from conftest import shared_file
from mindsft.data.alpaca import convert_alpaca
from mindsft.data.mindrecord import read_mindrecord
from mindsft.data.packing import first_fit_decreasing, pack_row, pack_samples, sample_ids
from mindsft.data.preprocess import PreprocessOptions, preprocess, stats_path
from mindsft.errors import ConfigError, DataError
from mindsft.demo_model import SAMPLE_ALPACA, sample_texts, train_tokenizer
from tools.llama_preprocess import main as preprocess_main

IGNORE = -100


def test_first_fit_decreasing_places_every_sample_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 101, 500)
    bins = first_fit_decreasing(lengths, 100)
    placed = sorted(i for members in bins for i in members)
    assert placed == list(range(500))
    assert all(sum(lengths[i] for i in members) <= 100 for members in bins)
    # FFD's bound: at most 11/9 OPT + 6/9 bins, and OPT >= total / capacity.
    assert len(bins) <= 11 / 9 * np.ceil(lengths.sum() / 100) + 1


def test_first_fit_decreasing_fills_the_first_bin_with_room():
    assert first_fit_decreasing([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    assert first_fit_decreasing([2, 3, 4, 5, 6], 10) == [[2, 4], [0, 1, 3]]
    assert first_fit_decreasing([10, 1], 10) == [[0], [1]]


def test_a_sample_larger_than_a_row_is_refused():
    with pytest.raises(DataError, match="sample 1 has 11 tokens; a row holds 1 to 10"):
        first_fit_decreasing([3, 11], 10)


def test_packed_row_holds_samples_then_padding_and_cumulative_ends():
    row = pack_row([(np.array([1, 5, 6]), np.array([IGNORE, 5, 6])), (np.array([1, 7]), np.array([IGNORE, 7]))],
                   8, pad_id=0, ignore_index=IGNORE)
    assert row["input_ids"].tolist() == [1, 5, 6, 1, 7, 0, 0, 0]
    assert row["labels"].tolist() == [IGNORE, 5, 6, IGNORE, 7, IGNORE, IGNORE, IGNORE]
    assert row["actual_seq_len"].tolist() == [3, 5, 8]
    full = pack_row([(np.array([1, 2]), np.array([1, 2]))] * 2, 4, 0, IGNORE)
    assert full["actual_seq_len"].tolist() == [2, 4]
    assert sample_ids([[3, 5, 8]], 8).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]


def test_pack_samples_reports_rows_samples_per_row_and_efficiency():
    samples = [(np.ones(n, np.int32), np.ones(n, np.int32)) for n in (6, 5, 4, 3, 1)]
    rows, summary = pack_samples(samples, 10, 0, IGNORE)
    assert summary == {"rows": 2, "samples_packed": 5, "samples_per_row": {"mean": 2.5, "min": 2, "max": 3},
                       "packing_efficiency": 0.95}
    assert [row["actual_seq_len"].tolist() for row in rows] == [[6, 10], [5, 8, 9, 10]]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sample")
    model_file = train_tokenizer(sample_texts(), str(folder / "tokenizer.model"))
    convert_alpaca(SAMPLE_ALPACA, folder / "conv.json")
    return folder, model_file


def run(folder, model_file, inputs, name, **kwargs):
    options = PreprocessOptions(input_glob=str(inputs), model_file=str(model_file),
                                output_file=str(folder / name), progress=False, command_line=["test"],
                                **{"seq_length": 256, **kwargs})
    return preprocess(options)


def unpacked_samples(records):
    """(ids, labels) of each padded record, cut at its last non-pad token."""
    out = []
    for record in records:
        used = int(np.nonzero(record["input_ids"])[0].max()) + 1
        out.append((record["input_ids"][:used].tolist(), record["labels"][:used].tolist()))
    return out


def packed_samples(records):
    out = []
    for record in records:
        start = 0
        for end in record["actual_seq_len"]:
            ids = record["input_ids"][start:end]
            if (ids != 0).any():  # the padding segment
                out.append((ids.tolist(), record["labels"][start:end].tolist()))
            start = end
    return out


def check_packing_loses_nothing(tmp_path, model_file, inputs, seq_length, **kwargs):
    plain = run(tmp_path, model_file, inputs, "plain/d.mindrecord", seq_length=seq_length, **kwargs)
    packed = run(tmp_path, model_file, inputs, "packed/d.mindrecord", seq_length=seq_length, packing=True, **kwargs)
    plain_records = read_mindrecord(tmp_path / "plain/d.mindrecord")
    packed_records = read_mindrecord(tmp_path / "packed/d.mindrecord")
    assert all(r["input_ids"].shape == r["labels"].shape == (seq_length + 1,) for r in packed_records)
    assert all(r["actual_seq_len"][-1] == seq_length + 1 for r in packed_records)
    assert sorted(unpacked_samples(plain_records)) == sorted(packed_samples(packed_records))
    assert packed["learned_tokens"] == plain["learned_tokens"]
    learned = lambda records: sorted(np.concatenate([r["labels"][r["labels"] != IGNORE] for r in records]).tolist())
    assert learned(packed_records) == learned(plain_records)
    assert packed["records_written"] == packed["rows"] == len(packed_records) < len(plain_records)
    assert packed["samples_packed"] == plain["records_written"]
    assert packed["packing_efficiency"] == round(plain["tokens"] / (len(packed_records) * (seq_length + 1)), 4)
    return plain, packed


def test_packing_loses_nothing_on_the_builtin_sample(sample, tmp_path):
    folder, model_file = sample
    _, packed = check_packing_loses_nothing(tmp_path, model_file, folder / "conv.json", 256)
    saved = json.loads(open(stats_path(tmp_path / "packed/d.mindrecord")).read())
    assert saved["packing"] is True and saved["rows"] == packed["rows"]
    assert saved["samples_per_row"]["mean"] > 1 and 0 < saved["packing_efficiency"] <= 1


def test_packing_loses_nothing_on_shared_alpaca_with_truncation_counted(tmp_path):
    model_file = shared_file("tokenizers/llama2/tokenizer.model")
    alpaca = shared_file("alpaca/alpaca_en_demo.json")
    convert_alpaca(alpaca, tmp_path / "conv.json")
    plain, packed = check_packing_loses_nothing(tmp_path, model_file, tmp_path / "conv.json", 512)
    assert packed["truncated"] == plain["truncated"] > 0  # alpaca's longest samples exceed 513 tokens
    assert packed["packing_efficiency"] > 0.9


def test_overlong_samples_dropped_when_asked_and_counted(sample, tmp_path):
    folder, model_file = sample
    stats = run(tmp_path, model_file, folder / "conv.json", "d/d.mindrecord", seq_length=96, packing=True,
                drop_overlong=True)
    assert stats["dropped"] > 0 and stats["samples_packed"] + stats["dropped"] == stats["records_read"]
    assert all(r["actual_seq_len"][-1] == 97 for r in read_mindrecord(tmp_path / "d/d.mindrecord"))


def test_packing_wiki_is_refused(sample, tmp_path):
    folder, model_file = sample
    with pytest.raises(ConfigError, match="packing applies to qa data"):
        run(tmp_path, model_file, folder / "conv.json", "w/d.mindrecord", dataset_type="wiki", packing=True)


def test_command_line_packs_and_says_so(sample, tmp_path, capsys):
    folder, model_file = sample
    code = preprocess_main(["--input_glob", str(folder / "conv.json"), "--model_file", str(model_file),
                            "--output_file", str(tmp_path / "p.mindrecord"), "--seq_length", "256", "--packing",
                            "--no_progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Packed 75 samples into" in out and "packing efficiency" in out
