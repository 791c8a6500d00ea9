"""alpaca_converter: MindFormers' conversation format with Stanford Alpaca's prompt, braces intact."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from mindsft.data.alpaca import convert_alpaca
from mindsft.errors import DataError
from mindsft.demo_model import SAMPLE_ALPACA
from mindsft.templates import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT


def stanford_prompt(record):
    # Stanford Alpaca's own construction (format_map), valid on records without braces.
    template = ALPACA_PROMPT_INPUT if record.get("input", "") != "" else ALPACA_PROMPT_NO_INPUT
    return template.format_map(record)


def test_converts_sample_records_in_order_with_string_ids(tmp_path):
    records = json.load(open(SAMPLE_ALPACA, encoding="utf-8"))
    out = tmp_path / "conv.json"
    assert convert_alpaca(SAMPLE_ALPACA, out) == len(records)
    converted = json.loads(out.read_text(encoding="utf-8"))
    assert [c["id"] for c in converted] == [str(i) for i in range(1, len(records) + 1)]
    for record, conv in zip(records, converted):
        assert conv["conversations"] == [{"from": "human", "value": stanford_prompt(record)},
                                         {"from": "gpt", "value": record["output"]}]
    assert any(r.get("input") for r in records) and any(not r.get("input") for r in records)
    # indent 2 and non-ASCII kept as is, as MindFormers writes it
    assert out.read_text(encoding="utf-8") == json.dumps(converted, ensure_ascii=False, indent=2)


def test_braces_survive_and_jsonl_input_is_read(tmp_path):
    source = tmp_path / "a.jsonl"
    rows = [{"instruction": "Fill {name} in: {0}", "input": "{\"k\": 1}", "output": "é {done}"},
            {"instruction": "Say hi", "output": "hi"},
            {"instruction": "Tab\there, quote \" and \\ back", "input": "\u0001 😀", "output": "\n"}]
    source.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "conv.json"
    convert_alpaca(source, out)
    converted = json.loads(out.read_text(encoding="utf-8"))
    assert "### Instruction:\nFill {name} in: {0}\n\n### Input:\n{\"k\": 1}\n\n### Response:" in \
        converted[0]["conversations"][0]["value"]
    assert converted[0]["conversations"][1]["value"] == "é {done}"
    assert converted[1]["conversations"][0]["value"] == stanford_prompt(rows[1])
    assert "é" in out.read_text(encoding="utf-8")
    # byte for byte what json's own indenting encoder writes, escapes included
    assert out.read_text(encoding="utf-8") == \
        json.dumps(converted, ensure_ascii=False, indent=2)


def test_json_lines_keep_line_separator_characters_inside_strings(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 unescaped; they are not line ends
    # in JSON Lines, so each record stays whole.
    source = tmp_path / "a.jsonl"
    rows = [{"instruction": "one\u2028two", "output": "three\u2029four\u0085five"},
            {"instruction": "Say hi", "output": "hi"}]
    source.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n", encoding="utf-8")
    out = tmp_path / "conv.json"
    assert convert_alpaca(source, out) == 2
    converted = json.loads(out.read_text(encoding="utf-8"))
    assert converted[0]["conversations"][1]["value"] == "three\u2029four\u0085five"
    assert converted[0]["conversations"][0]["value"] == stanford_prompt(rows[0])


@pytest.mark.parametrize("content, message", [
    ('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
     r"malformed JSON at line 2 column 22"),
    ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', r"record 1: missing field 'output'"),
    ('[{"instruction": "a", "output": 3}]', r"record 0: field 'output' is int, not a string"),
])
def test_bad_input_names_file_and_record_and_writes_nothing(tmp_path, content, message):
    source = tmp_path / "bad.json"
    source.write_text(content)
    out = tmp_path / "conv.json"
    with pytest.raises(DataError, match=message) as err:
        convert_alpaca(source, out)
    assert str(source) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_cli_help_and_error_exit(tmp_path):
    tool = str(ROOT / "tools" / "alpaca_converter.py")
    assert "--data_path" in subprocess.run([sys.executable, tool, "--help"], capture_output=True, text=True).stdout
    result = subprocess.run([sys.executable, tool, "--data_path", str(tmp_path / "none.json"),
                             "--output_path", str(tmp_path / "o.json")], capture_output=True, text=True)
    assert result.returncode == 1 and "none.json: cannot read" in result.stderr
