"""llama_preprocess on the built-in sample: record layout, label masks, workers, shards, stats, errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, shared_file
from mindsft.data.alpaca import convert_alpaca
from mindsft.data.mindrecord import read_mindrecord, write_mindrecord
from mindsft.data.preprocess import PreprocessOptions, clean_wikitext, preprocess, stats_path
from mindsft.errors import DataError
from mindsft.demo_model import SAMPLE_ALPACA, sample_texts, train_tokenizer
from mindsft.tokenizer import LlamaTokenizer

IGNORE = -100


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sample")
    model_file = train_tokenizer(sample_texts(), str(folder / "tokenizer.model"))
    convert_alpaca(SAMPLE_ALPACA, folder / "conv.json")
    return folder, model_file


def run(folder, model_file, inputs, name="out/data.mindrecord", **kwargs):
    options = PreprocessOptions(input_glob=str(inputs), model_file=model_file, output_file=str(folder / name),
                                progress=False, command_line=["test"], **{"seq_length": 256, **kwargs})
    return preprocess(options)


def test_qa_records_hold_bos_rounds_eos_padding_and_masks(sample, tmp_path):
    folder, model_file = sample
    stats = run(tmp_path, model_file, folder / "conv.json", seq_length=512)
    records = read_mindrecord(tmp_path / "out/data.mindrecord")
    conversations = json.load(open(folder / "conv.json", encoding="utf-8"))
    tokenizer = LlamaTokenizer(model_file)
    assert len(records) == len(conversations) == stats["records_written"]
    for record, conv in zip(records, conversations):
        ids, labels = record["input_ids"], record["labels"]
        assert ids.dtype == np.int32 and ids.shape == labels.shape == (513,)
        prompt, reply = conv["conversations"][0]["value"], conv["conversations"][1]["value"]
        length = int(np.count_nonzero(ids)) if stats["truncated"] == 0 else None
        expected = [tokenizer.bos_id] + tokenizer.encode(prompt_text(prompt) + " " + reply) + [tokenizer.eos_id]
        assert ids[:len(expected)].tolist() == expected and length == len(expected)
        assert (ids[len(expected):] == 0).all() and (labels[len(expected):] == IGNORE).all()
        learned = labels != IGNORE
        assert labels[learned].tolist() == ids[learned].tolist()
        assert tokenizer.decode(ids[learned][:-1]) == reply and ids[learned][-1] == tokenizer.eos_id
    assert stats["learned_tokens"] == sum(int((r["labels"] != IGNORE).sum()) for r in records)


def prompt_text(prompt):
    from mindsft.templates import VicunaTemplate
    return VicunaTemplate.default_system + " USER: " + prompt + " ASSISTANT:"


def test_stats_json_names_template_tokenizer_and_counts(sample, tmp_path):
    folder, model_file = sample
    run(tmp_path, model_file, folder / "conv.json", template="chatml")
    stats = json.loads(open(stats_path(tmp_path / "out/data.mindrecord")).read())
    assert stats["template"] == "chatml" and stats["seq_length"] == 256 and stats["dataset_type"] == "qa"
    assert stats["tokenizer_sha256"] == LlamaTokenizer(model_file).sha256()
    assert stats["records_read"] == 75 and stats["command_line"] == ["test"]
    assert stats["records_written"] + stats["dropped"] + stats["skipped"] == 75


def test_same_bytes_with_one_and_two_workers(sample, tmp_path, monkeypatch):
    folder, model_file = sample
    import mindsft.data.preprocess
    monkeypatch.setattr(mindsft.data.preprocess, "CHUNK_RECORDS", 8)  # many chunks, out-of-order finishes
    run(tmp_path, model_file, folder / "conv.json", name="w1/d.mindrecord", num_workers=1)
    run(tmp_path, model_file, folder / "conv.json", name="w2/d.mindrecord", num_workers=2)
    one = (tmp_path / "w1/d.mindrecord").read_bytes()
    assert one == (tmp_path / "w2/d.mindrecord").read_bytes() and len(one) > 0


def test_one_and_three_partitions_hold_the_same_records_in_order(sample, tmp_path):
    folder, model_file = sample
    stats = run(tmp_path, model_file, folder / "conv.json", name="p1/d.mindrecord", seq_length=512)
    run(tmp_path, model_file, folder / "conv.json", name="p3/d.mindrecord", seq_length=512, file_partition=3)
    assert sorted(os.listdir(tmp_path / "p3")) == sorted(
        [f"d.mindrecord{i}{s}" for i in range(3) for s in ("", ".db")] + ["d.mindrecord.stats.json"])
    single = read_mindrecord(tmp_path / "p1/d.mindrecord")
    sharded = read_mindrecord(tmp_path / "p3/d.mindrecord", partitions=3)
    assert len(single) == len(sharded) == stats["records_written"] == 75
    for a, b in zip(single, sharded):
        assert a["input_ids"].tolist() == b["input_ids"].tolist() and a["labels"].tolist() == b["labels"].tolist()


def test_overlong_truncated_or_dropped_and_never_written_blank(sample, tmp_path):
    folder, model_file = sample
    short_system = {"from": "system", "value": "Be brief."}
    long_prompt = {"id": "x", "conversations": [short_system, {"from": "human", "value": "word " * 400},
                                                {"from": "gpt", "value": "answer"}]}
    long_reply = {"id": "y", "conversations": [short_system, {"from": "human", "value": "hi"},
                                               {"from": "gpt", "value": "word " * 400}]}
    source = tmp_path / "long.json"
    source.write_text(json.dumps([long_prompt, long_reply]))
    stats = run(tmp_path, model_file, source, seq_length=64)
    assert (stats["records_written"], stats["truncated"], stats["dropped"]) == (1, 1, 1)
    assert stats["dropped_records"] == [{"file": str(source), "record": 0, "reason": "no_learned_token"}]
    (record,) = read_mindrecord(tmp_path / "out/data.mindrecord")
    assert (record["input_ids"] != 0).all() and (record["labels"] != IGNORE).sum() > 0
    with pytest.raises(DataError, match=r"no record left to write \(0 skipped, 2 dropped\); nothing written"):
        run(tmp_path, model_file, source, name="drop/d.mindrecord", seq_length=64, drop_overlong=True)
    assert not (tmp_path / "drop").exists() or not os.listdir(tmp_path / "drop")


def test_sharegpt_openai_and_system_messages_are_read(sample, tmp_path):
    folder, model_file = sample
    source = tmp_path / "mixed.jsonl"
    rows = [{"conversations": [{"from": "system", "value": "Answer in one word."}, {"from": "human", "value": "Color?"},
                               {"from": "gpt", "value": "Blue"}, {"from": "human", "value": "Again?"},
                               {"from": "gpt", "value": "Red"}]},
            {"messages": [{"role": "user", "content": "Color?"}, {"role": "assistant", "content": "Green"}]}]
    source.write_text("\n".join(json.dumps(r) for r in rows))
    run(tmp_path, model_file, source)
    tokenizer = LlamaTokenizer(model_file)
    first, second = read_mindrecord(tmp_path / "out/data.mindrecord")
    learned = first["labels"][first["labels"] != IGNORE].tolist()
    eos = tokenizer.eos_id
    assert learned.count(eos) == 2
    split = learned.index(eos)
    assert tokenizer.decode(learned[:split]) == "Blue" and tokenizer.decode(learned[split + 1:-1]) == "Red"
    text = tokenizer.decode(first["input_ids"][first["input_ids"] != 0])
    assert text.startswith("Answer in one word. USER: Color? ASSISTANT: Blue")
    assert tokenizer.decode(second["labels"][second["labels"] != IGNORE][:-1]) == "Green"


BAD_INPUTS = {
    "malformed JSON": ('[{"conversations": []}', "malformed JSON at line 1 column 23"),
    "missing field": ('[{"conversations": [{"from": "human"}]}]', "record 0: conversations\\[0\\] has no 'value'"),
    "wrong role order": ('[{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}]',
                         "record 0: message 1: role 'user' where 'assistant' was expected"),
    "non-string value": ('[{"conversations": [{"from": "human", "value": 1}, {"from": "gpt", "value": "b"}]}]',
                         "record 0: turn 0: value is int, not a string"),
    "empty conversation": ('[{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},'
                           ' {"conversations": []}]', "record 1: empty conversation"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_malformed_input_names_file_and_record_and_leaves_no_output(sample, tmp_path, case):
    _, model_file = sample
    content, message = BAD_INPUTS[case]
    source = tmp_path / "bad.json"
    source.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        run(tmp_path, model_file, source, name="out/d.mindrecord", file_partition=2)
    assert str(source) in str(err.value)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_skip_counts_bad_records_and_goes_on(sample, tmp_path):
    _, model_file = sample
    source = tmp_path / "bad.json"
    source.write_text(BAD_INPUTS["empty conversation"][0])
    stats = run(tmp_path, model_file, source, on_error="skip")
    assert (stats["records_written"], stats["skipped"]) == (1, 1)
    assert stats["skipped_records"] == [{"file": str(source), "record": 1, "reason": "empty conversation"}]


def test_glob_reads_several_files_in_sorted_order(sample, tmp_path):
    folder, model_file = sample
    conversations = json.load(open(folder / "conv.json"))
    for i, part in enumerate((conversations[:30], conversations[30:])):
        (tmp_path / f"part{i}.json").write_text(json.dumps(part))
    run(tmp_path, model_file, tmp_path / "part*.json", name="glob/d.mindrecord")
    run(tmp_path, model_file, folder / "conv.json", name="one/d.mindrecord")
    assert (tmp_path / "glob/d.mindrecord").read_bytes() == (tmp_path / "one/d.mindrecord").read_bytes()


def test_wiki_chunks_concatenated_paragraphs(sample, tmp_path):
    _, model_file = sample
    paragraphs = [" = Title = ", " The cat @-@ like animal sat . ", " It cost 1 @,@ 000 and 2 @.@ 5 . "] * 20
    source = tmp_path / "wiki.tokens"
    source.write_text(" \n".join(paragraphs[i] + " \n" for i in range(len(paragraphs))))
    stats = run(tmp_path, model_file, source, dataset_type="wiki", seq_length=31, repeat=2)
    tokenizer = LlamaTokenizer(model_file)
    expected = []
    for para in clean_wikitext(source.read_text()).split("\n\n"):
        if para and not para.strip().startswith("="):
            expected += tokenizer.encode(para, add_bos=True, add_eos=True)
    assert "cat-like" in clean_wikitext(source.read_text()) and "1,000" in clean_wikitext(source.read_text())
    expected = expected * 2
    records = read_mindrecord(tmp_path / "out/data.mindrecord")
    assert len(records) == len(expected) // 32 == stats["records_written"]
    assert np.concatenate([r["input_ids"] for r in records]).tolist() == expected[:len(records) * 32]
    assert set(records[0]) == {"input_ids"}


def test_write_mindrecord_is_readable_and_checks_columns(tmp_path):
    out = tmp_path / "x.mindrecord"
    files, count = write_mindrecord(({"input_ids": [i, i + 1]} for i in range(5)), out, "wiki", 2)
    assert count == 5 and files == [f"{out}0", f"{out}1"]
    assert [r["input_ids"].tolist() for r in read_mindrecord(out, 2)] == [[i, i + 1] for i in range(5)]
    with pytest.raises(DataError, match="record 0 has no column 'labels'"):
        write_mindrecord(iter([{"input_ids": [1]}]), tmp_path / "y.mindrecord", "qa")
    assert not list(tmp_path.glob("y.mindrecord*"))


def test_rows_read_back_as_mindrecords_own_writer_writes_them(tmp_path):
    """write_mindrecord hands prebuilt rows to MindRecord's C++ writer; MindDataset reads the same
    arrays as from a file written through FileWriter's public write_raw_data."""
    from mindspore.mindrecord import FileWriter
    from mindsft.data.schema import mindrecord_schema
    rng = np.random.default_rng(0)
    rows = [{"input_ids": rng.integers(0, 32000, 9, dtype=np.int32),
             "labels": rng.integers(-100, 32000, 9, dtype=np.int32)} for _ in range(7)]
    write_mindrecord(iter(rows), tmp_path / "ours.mindrecord", "qa")
    writer = FileWriter(str(tmp_path / "public.mindrecord"), shard_num=1, overwrite=True)
    writer.add_schema(mindrecord_schema("qa"), "qa")
    writer.write_raw_data(rows)
    writer.commit()
    ours, public = read_mindrecord(tmp_path / "ours.mindrecord"), read_mindrecord(tmp_path / "public.mindrecord")
    assert len(ours) == len(public) == 7
    for got, expected, row in zip(ours, public, rows):
        for column in ("input_ids", "labels"):
            assert got[column].tolist() == expected[column].tolist() == row[column].tolist()


def test_cli_runs_and_reports(sample, tmp_path):
    folder, model_file = sample
    tool = str(ROOT / "tools" / "llama_preprocess.py")
    help_text = subprocess.run([sys.executable, tool, "--help"], capture_output=True, text=True).stdout
    assert "--num_workers" in help_text and "--on_error" in help_text
    result = subprocess.run([sys.executable, tool, "--input_glob", str(folder / "conv.json"), "--model_file", model_file,
                             "--seq_length", "512", "--output_file", str(tmp_path / "c.mindrecord"), "--no_progress"],
                            capture_output=True, text=True, env={**os.environ, "GLOG_v": "3"})
    assert result.returncode == 0, result.stderr
    assert "Wrote 75 records of 513 tokens" in result.stdout
