"""Preference pairs: reading the record formats LLaMA-Factory and TRL take, and encoding each pair
as two records (chosen, rejected) of `seq_length + 1` tokens with exact label masks.

A pair is one prompt (a conversation ending with a user turn) and two replies. Each side is
the prompt plus its reply rendered with the same template and tokenizer as SFT data; only the
final reply and the end token closing it are learned (earlier assistant turns of a multi-turn
prompt are context, as in LLaMA-Factory's pairwise data).

Formats (JSON array or JSON Lines, as `mindsft.data.conversations` reads):
- alpaca-style: `instruction`, `input` (optional), `system` (optional), `chosen`, `rejected`
  (strings);
- ShareGPT-style: `conversations` (ending with the user's turn), `system` (optional), and
  `chosen` / `rejected` messages (`{"from": "gpt", "value": ...}`);
- TRL: `prompt` / `chosen` / `rejected`, plain (strings) or conversational (lists of messages),
  or without `prompt` (implicit prompt: `chosen` and `rejected` are whole conversations that
  share all messages but the last).
"""
import numpy as np

from mindsft.data.conversations import SHAREGPT_ROLES, normalize_record
from mindsft.data.schema import IGNORE_INDEX, record_length
from mindsft.errors import DataError
from mindsft.templates import encode_segment_arrays

PAIR_KEYS = ("chosen", "rejected")


def is_pairwise_record(record):
    """Whether a raw record is a preference pair (has `chosen` and `rejected`)."""
    return isinstance(record, dict) and all(key in record for key in PAIR_KEYS)


def _reply_text(value, key):
    """The text of one reply: a string, a message object, or a list ending in the assistant's message."""
    if isinstance(value, list):
        if not value:
            raise DataError(f"'{key}' is an empty list of messages")
        value = value[-1]
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        role = value.get("role", SHAREGPT_ROLES.get(value.get("from")))
        text = value.get("content", value.get("value"))
        if role != "assistant":
            raise DataError(f"'{key}' message has role {role!r}; the reply must be the assistant's")
        if not isinstance(text, str):
            raise DataError(f"'{key}' message has no text ('content' or 'value' string)")
        return text
    raise DataError(f"'{key}' is {type(value).__name__}, not a string, a message or a list of messages")


def _as_messages(turns, key):
    """A list of OpenAI or ShareGPT messages as [{"role", "content"}] (through normalize_record's checks)."""
    if not isinstance(turns, list):
        raise DataError(f"'{key}' is not a list of messages")
    if turns and isinstance(turns[0], dict) and "from" in turns[0]:
        return normalize_record({"conversations": turns + [{"from": "gpt", "value": "x"}]})[:-1]
    return normalize_record({"messages": turns + [{"role": "assistant", "content": "x"}]})[:-1]


def normalize_pair(record):
    """(prompt messages ending with the user's turn, chosen reply text, rejected reply text)."""
    if not is_pairwise_record(record):
        raise DataError("not a preference pair: no 'chosen' and 'rejected' fields")
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = _as_messages(prompt, "prompt")
        if isinstance(record.get("system"), str) and record["system"] and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": record["system"]})
    elif "conversations" in record or "messages" in record or "instruction" in record:
        prompt_fields = {k: v for k, v in record.items() if k not in PAIR_KEYS + ("output",)}
        messages = normalize_record(dict(prompt_fields, **(
            {"conversations": list(record["conversations"]) + [{"from": "gpt", "value": "x"}]}
            if "conversations" in record else
            {"messages": list(record["messages"]) + [{"role": "assistant", "content": "x"}]}
            if "messages" in record else {})))
        if "instruction" not in record:
            messages = messages[:-1]
        elif isinstance(record.get("system"), str) and record["system"]:
            messages.insert(0, {"role": "system", "content": record["system"]})
    elif isinstance(chosen, list) and isinstance(rejected, list):
        # TRL's implicit prompt: the messages both conversations share.
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0 or len(chosen) != shared + 1 or len(rejected) != shared + 1:
            raise DataError("'chosen' and 'rejected' conversations must share every message but the last "
                            "(or give the prompt in a 'prompt' field)")
        messages = _as_messages(chosen[:shared], "chosen")
    else:
        raise DataError("no prompt: give 'prompt', 'conversations', 'messages' or 'instruction' beside "
                        "'chosen' and 'rejected'")
    if not messages or messages[-1]["role"] != "user":
        raise DataError("the prompt must end with a user message")
    return messages, _reply_text(chosen, "chosen"), _reply_text(rejected, "rejected")


def encode_side(tokenizer, template, prompt, reply, tools=None):
    """(prompt ids, reply ids, reply learned flags) of prompt + reply: the reply part starts at the
    first learned token of the final reply; nothing before it is learned."""
    messages = prompt + [{"role": "assistant", "content": reply}]
    ids, learned = encode_segment_arrays(tokenizer, template.segments(messages, tools=tools))
    ids, learned = np.asarray(ids, np.int32), np.asarray(learned, bool)
    starts = np.nonzero(learned & ~np.concatenate([[False], learned[:-1]]))[0]
    if not starts.size:
        raise DataError("the template learns no token of the reply")
    start = int(starts[-1])
    return ids[:start], ids[start:], learned[start:]


def cut_lengths(prompt_length, reply_length, length):
    """(prompt tokens kept, reply tokens kept) of a pair longer than `length`: LLaMA-Factory's rule
    (`infer_seqlen`), which cuts the prompt first while the reply fits in half of the record."""
    if reply_length * 2 < length:
        most_reply = length
    elif prompt_length * 2 < length:
        most_reply = length - prompt_length
    else:
        most_reply = int(length * (reply_length / (prompt_length + reply_length)))
    reply_kept = min(most_reply, reply_length)
    return min(max(length - reply_kept, 0), prompt_length), reply_kept


def _padded(ids, learned, length, pad_id):
    input_ids = np.full(length, pad_id, np.int32)
    labels = np.full(length, IGNORE_INDEX, np.int32)
    input_ids[:len(ids)] = ids
    labels[:len(ids)] = np.where(learned, ids, IGNORE_INDEX)
    return input_ids, labels


def encode_pair(tokenizer, template, record, seq_length, pad_id, drop_overlong=False):
    """(row of the four pair columns or None, outcome) of one raw pair record; outcome is "written",
    "truncated" (the prompt, then if needed both replies, cut to fit) or "dropped_overlong"."""
    prompt, chosen, rejected = normalize_pair(record)
    tools = record.get("tools") or None
    chosen_prompt, chosen_ids, chosen_learned = encode_side(tokenizer, template, prompt, chosen, tools)
    rejected_prompt, rejected_ids, rejected_learned = encode_side(tokenizer, template, prompt, rejected, tools)
    length = record_length(seq_length)
    outcome = "written"
    longest = max(len(chosen_ids), len(rejected_ids))
    if max(len(chosen_prompt), len(rejected_prompt)) + longest > length:
        if drop_overlong:
            return None, "dropped_overlong"
        outcome = "truncated"
        prompt_kept, reply_kept = cut_lengths(max(len(chosen_prompt), len(rejected_prompt)), longest, length)
        chosen_prompt, rejected_prompt = chosen_prompt[:prompt_kept], rejected_prompt[:prompt_kept]
        chosen_ids, chosen_learned = chosen_ids[:reply_kept], chosen_learned[:reply_kept]
        rejected_ids, rejected_learned = rejected_ids[:reply_kept], rejected_learned[:reply_kept]
    row = {}
    for side, prompt_ids, reply_ids, reply_learned in (("chosen", chosen_prompt, chosen_ids, chosen_learned),
                                                       ("rejected", rejected_prompt, rejected_ids, rejected_learned)):
        ids = np.concatenate([prompt_ids, reply_ids])
        learned = np.concatenate([np.zeros(len(prompt_ids), bool), reply_learned])
        if not learned.any():
            return None, "dropped_no_learned_token"
        row[f"{side}_input_ids"], row[f"{side}_labels"] = _padded(ids, learned, length, pad_id)
    return row, outcome
