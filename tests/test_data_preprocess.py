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


def _public_write(path, rows, dataset_type, packed=False, batch=512):
    from mindspore.mindrecord import FileWriter
    from mindsft.data.schema import mindrecord_schema
    os.makedirs(os.path.dirname(path), exist_ok=True)
    writer = FileWriter(str(path), shard_num=1, overwrite=True)
    writer.add_schema(mindrecord_schema(dataset_type, packed), dataset_type)
    for start in range(0, len(rows), batch):
        writer.write_raw_data(rows[start:start + batch])
    writer.commit()


# Values at every edge of MindRecord's 1/2/4-byte integer widths.
WIDTH_EDGES = np.array([-2**31, -32769, -32768, -32767, -129, -128, -127, -100, -1, 0, 1, 127, 128, 32767, 32768,
                        128004, 2**31 - 1], np.int32)


@pytest.mark.parametrize("row_length,rows,pad", [(7, 5, 128004), (8, 600, 0), (9, 1100, -5), (2049, 300, 128004)])
def test_rows_are_written_as_filewriter_writes_them_byte_for_byte(tmp_path, row_length, rows, pad):
    """write_mindrecord compresses the rows itself and hands them to MindRecord's C++ writer: the
    files equal FileWriter's public write_raw_data output byte for byte, from padded blocks, dense
    blocks and single records alike, at every integer width."""
    from mindsft.data.mindrecord import RowBlock
    rng = np.random.default_rng(row_length)
    lengths = rng.integers(1, row_length + 1, rows)
    ids = rng.choice(WIDTH_EDGES, lengths.sum()) if row_length < 100 else rng.integers(0, 128256, lengths.sum())
    ids = ids.astype(np.int32)
    labels = np.where(rng.random(len(ids)) < 0.5, IGNORE, ids).astype(np.int32)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    padded = [{"input_ids": np.concatenate([ids[s:s + n], np.full(row_length - n, pad, np.int32)]),
               "labels": np.concatenate([labels[s:s + n], np.full(row_length - n, IGNORE, np.int32)])}
              for s, n in zip(starts, lengths)]
    _public_write(tmp_path / "public/d.mindrecord", padded, "qa")
    blocks = [RowBlock.padded({"input_ids": ids[starts[i]:starts[i] + lengths[i:i + 256].sum()],
                               "labels": labels[starts[i]:starts[i] + lengths[i:i + 256].sum()]},
                              lengths[i:i + 256], row_length, {"input_ids": pad, "labels": IGNORE})
              for i in range(0, rows, 256)]
    dense = [RowBlock({c: np.stack([r[c] for r in padded[i:i + 100]]) for c in ("input_ids", "labels")})
             for i in range(0, rows, 100)]
    expected = [(tmp_path / "public" / name).read_bytes() for name in ("d.mindrecord", "d.mindrecord.db")]
    for way, records in (("padded", blocks), ("dense", dense), ("records", padded)):
        write_mindrecord(iter(records), tmp_path / way / "d.mindrecord", "qa")
        assert [(tmp_path / way / name).read_bytes() for name in ("d.mindrecord", "d.mindrecord.db")] == expected, way


def test_single_column_and_packed_rows_are_written_as_filewriter_writes_them(tmp_path):
    rng = np.random.default_rng(0)
    wiki = [{"input_ids": rng.choice(WIDTH_EDGES, 33)} for _ in range(40)]
    packed = [{"input_ids": rng.choice(WIDTH_EDGES, 33), "labels": rng.choice(WIDTH_EDGES, 33),
               "actual_seq_len": rng.choice(WIDTH_EDGES, int(rng.integers(1, 6)))} for _ in range(40)]
    for name, rows, dataset_type, is_packed in (("wiki", wiki, "wiki", False), ("packed", packed, "qa", True)):
        _public_write(tmp_path / "public" / name / "d.mindrecord", rows, dataset_type, is_packed)
        write_mindrecord(iter(rows), tmp_path / "ours" / name / "d.mindrecord", dataset_type, packed=is_packed)
        for file in ("d.mindrecord", "d.mindrecord.db"):
            assert (tmp_path / "ours" / name / file).read_bytes() == (tmp_path / "public" / name / file).read_bytes()
    for got, row in zip(read_mindrecord(tmp_path / "ours" / "packed" / "d.mindrecord"), packed):
        assert all(got[column].tolist() == row[column].tolist() for column in row)


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
