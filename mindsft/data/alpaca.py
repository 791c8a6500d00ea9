"""Stanford Alpaca records to the conversation JSON that llama_preprocess reads (MindFormers'
alpaca_converter format: `{"id": "1", "conversations": [human prompt, gpt output]}`)."""
import json

from mindsft.data.conversations import read_json_records
from mindsft.errors import DataError
from mindsft.files import atomic_output, check_output_path
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
            json.dump(converted, f, ensure_ascii=False, indent=2)
    return len(converted)
