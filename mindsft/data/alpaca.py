"""Stanford Alpaca records to the conversation JSON that llama_preprocess reads (MindFormers'
alpaca_converter format: `{"id": "1", "conversations": [human prompt, gpt output]}`)."""
from json.encoder import encode_basestring

from mindsft.data.conversations import read_json_records
from mindsft.errors import DataError
from mindsft.output_files import atomic_output, check_output_path
from mindsft.templates import alpaca_prompt


def alpaca_to_conversation(record, number):
    """One alpaca record as a conversation with id `str(number)`."""
    if not isinstance(record, dict):
        raise DataError(f"record is a {type(record).__name__}, not an object")
    for key in ("instruction", "output"):
        if key not in record:
            raise DataError(f"missing field '{key}'")
    for key in ("instruction", "input", "output"):
        if key in record and not isinstance(record[key], str):
            raise DataError(f"field '{key}' is {type(record[key]).__name__}, not a string")
    return {"id": str(number), "conversations": [
        {"from": "human", "value": alpaca_prompt(record["instruction"], record.get("input", ""))},
        {"from": "gpt", "value": record["output"]}]}


def convert_alpaca(data_path, output_path):
    """Convert an alpaca JSON array or JSON Lines file; returns the number of records written."""
    check_output_path(output_path)  # before reading: a folder there is a mistake, never replaced
    records = read_json_records(data_path)
    if not isinstance(records, list):
        raise DataError(f"{data_path}: expected a JSON array of records")
    converted = []
    for index, record in enumerate(records):
        try:
            converted.append(alpaca_to_conversation(record, index + 1))
        except DataError as err:
            raise DataError(f"{data_path}: record {index}: {err}") from None
    with atomic_output(output_path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(conversations_json(converted))
    return len(converted)


# One converted record as `json.dumps(records, ensure_ascii=False, indent=2)` lays it out.
_RECORD_LAYOUT = ('  {{\n    "id": {},\n    "conversations": [\n      {{\n        "from": "human",\n'
                  '        "value": {}\n      }},\n      {{\n        "from": "gpt",\n        "value": {}\n'
                  '      }}\n    ]\n  }}')


def conversations_json(converted):
    """The pieces of the text `json.dump(converted, ensure_ascii=False, indent=2)` writes, from the
    fixed layout of converted records: json's indenting encoder is pure Python and took ~1.5 s of
    a 21k-record conversion, its C string encoder takes ~0.1 s."""
    if not converted:
        yield "[]"
        return
    for position, c in enumerate(converted):
        yield ",\n" if position else "[\n"
        yield _RECORD_LAYOUT.format(encode_basestring(c["id"]), encode_basestring(c["conversations"][0]["value"]),
                                    encode_basestring(c["conversations"][1]["value"]))
    yield "\n]"
