"""Reading instruction data: JSON arrays or JSON Lines of alpaca-converted, ShareGPT, OpenAI
messages or plain alpaca records, normalised to `[{"role", "content"}]` messages.

Every error names the file and the record index (0-based, in file order).
"""
import json
import os

from mindsft.errors import DataError
from mindsft.templates import alpaca_prompt, split_system

# Message fields besides role and content that chat templates read (tool calls, reasoning).
TOOL_MESSAGE_KEYS = ("tool_calls", "tool_call_id", "name", "reasoning_content", "thinking", "reasoning")
# ShareGPT speakers as they appear in the wild, mapped to chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}


def read_json_records(path):
    """All records of a JSON array or JSON Lines file, in order; a parse error names its position."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: malformed JSON at line {err.lineno} column {err.colno} "
                            f"(char {err.pos}): {err.msg}") from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply to read") from None
        return records
    if not stripped:
        raise DataError(f"{path}: empty file (expected a JSON array or JSON Lines)")
    records = []
    # Lines end at "\n" only (JSON Lines): str.splitlines() would also cut a record at a raw U+2028 or
    # U+0085 inside a string, which json.dumps(ensure_ascii=False) writes unescaped.
    for line_number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: malformed JSON Lines at line {line_number} column {err.colno}, "
                            f"record {len(records)}: {err.msg}") from None
        except RecursionError:
            raise DataError(f"{path}: JSON Lines line {line_number} is nested too deeply to read") from None
    return records


def normalize_record(record):
    """Messages of one record (ShareGPT `conversations`, OpenAI `messages`, or alpaca fields)."""
    if not isinstance(record, dict):
        raise DataError(f"record is a {type(record).__name__}, not an object")
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise DataError("'conversations' is not a list")
        messages = []
        for position, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise DataError(f"conversations[{position}] is not an object")
            for key in ("from", "value"):
                if key not in turn:
                    raise DataError(f"conversations[{position}] has no '{key}' field")
            if turn["from"] not in SHAREGPT_ROLES:
                raise DataError(f"conversations[{position}]: unknown speaker {turn['from']!r} "
                                f"(known: {', '.join(SHAREGPT_ROLES)})")
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
        if isinstance(record.get("system"), str) and record["system"] and \
                not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": record["system"]})
    elif "messages" in record:
        turns = record["messages"]
        if not isinstance(turns, list):
            raise DataError("'messages' is not a list")
        messages = []
        for position, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise DataError(f"messages[{position}] is not an object")
            for key in ("role", "content"):
                if key not in turn:
                    raise DataError(f"messages[{position}] has no '{key}' field")
            if turn["role"] not in ("user", "assistant", "system", "tool"):
                raise DataError(f"messages[{position}]: unknown role {turn['role']!r}")
            message = {"role": turn["role"], "content": turn["content"]}
            # What a jinja chat template reads besides the text (template hf): kept as given.
            message.update({key: turn[key] for key in TOOL_MESSAGE_KEYS if turn.get(key) is not None})
            if message["content"] is None and message.get("tool_calls"):
                message["content"] = ""
            messages.append(message)
    elif "instruction" in record:
        for key in ("instruction", "input", "output"):
            if key in record and not isinstance(record[key], str):
                raise DataError(f"field '{key}' is {type(record[key]).__name__}, not a string")
        messages = [{"role": "user", "content": alpaca_prompt(record["instruction"], record.get("input", ""))}]
        if "output" in record:
            messages.append({"role": "assistant", "content": record["output"]})
    else:
        raise DataError("no 'conversations', 'messages' or 'instruction' field")
    for position, message in enumerate(messages):
        if not isinstance(message["content"], str):
            raise DataError(f"turn {position}: value is {type(message['content']).__name__}, not a string")
    # Order and emptiness are checked here so a reader of prompts gets the same errors as training;
    # a conversation with tool turns is checked by the chat template that renders it.
    if not any(m["role"] == "tool" or "tool_calls" in m for m in messages):
        split_system(messages)
    return messages


def record_tools(record):
    """The tool schemas of an OpenAI-style record (`tools`), or None."""
    tools = record.get("tools") if isinstance(record, dict) else None
    if tools is not None and not isinstance(tools, list):
        raise DataError("'tools' is not a list")
    return tools or None

