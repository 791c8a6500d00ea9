"""The prompt-template registry: one place that turns a conversation into text and tokens.

A template lays a conversation out as a list of `Segment`s: plain text that the model reads
(`learned=False`), reply text that it learns (`learned=True`), and the special tokens BOS/EOS.
Training data, the rendered text and the inference prompt all come from the same segments, so
the prompt the model is asked at predict time is byte for byte the text it was trained on
before each reply.

Messages are `[{"role": "user" | "assistant" | "system", "content": str}]`: an optional system
message first, then user and assistant turns alternating, starting with the user.
"""
import dataclasses
import os

import numpy as np

from mindsft.errors import ConfigError, DataError
from mindsft.input_files import read_json

BOS_TEXT, EOS_TEXT = "<s>", "</s>"

# Stanford Alpaca's prompts, verbatim (tatsu-lab/stanford_alpaca train.py).
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:")


def alpaca_prompt(instruction, input_text=""):
    """The Stanford Alpaca prompt for one instruction; braces in the text are kept as they are."""
    # Plain concatenation, not format_map: instructions full of code braces must survive.
    if input_text:
        head, rest = ALPACA_PROMPT_INPUT.split("{instruction}")
        middle, tail = rest.split("{input}")
        return head + instruction + middle + input_text + tail
    head, tail = ALPACA_PROMPT_NO_INPUT.split("{instruction}")
    return head + instruction + tail


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of text, or a special token (`special` = "bos" | "eos"), learned or not."""
    text: str = ""
    learned: bool = False
    special: str = None


def split_system(messages, system=None):
    """(system text or None, turns) after checking roles, types and the user/assistant order."""
    if not messages:
        raise DataError("empty conversation")
    turns = list(messages)
    if turns[0].get("role") == "system":
        system = turns.pop(0).get("content") if system is None else system
    for position, message in enumerate(turns):
        role, content = message.get("role"), message.get("content")
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(f"message {position}: role {role!r} where {expected!r} was expected "
                            "(turns must alternate user, assistant, starting with the user)")
        if not isinstance(content, str):
            raise DataError(f"message {position}: content is {type(content).__name__}, not a string")
    if not turns:
        raise DataError("conversation has a system message but no turns")
    return system, turns


class Template:
    """Base: subclasses say how one round (user turn, assistant reply) is laid out."""
    name = None
    default_system = None

    def round_segments(self, index, system, user, reply):
        """Segments of round `index`; `reply` is None for the generation prompt."""
        raise NotImplementedError

    def segments(self, messages, system=None, add_generation_prompt=False):
        """The whole conversation as segments. With `add_generation_prompt` the last message must
        be a user turn and the segments end where the assistant's reply starts."""
        system, turns = split_system(messages, system)
        if system is None:
            system = self.default_system
        last_is_user = len(turns) % 2 == 1
        if add_generation_prompt and not last_is_user:
            raise DataError("the prompt must end with a user message")
        if not add_generation_prompt and last_is_user:
            raise DataError("conversation ends with a user turn that has no assistant reply")
        out = [Segment(special="bos")]
        for index in range(0, len(turns), 2):
            reply = turns[index + 1]["content"] if index + 1 < len(turns) else None
            out.extend(self.round_segments(index // 2, system, turns[index]["content"], reply))
        return out

    def render(self, messages, system=None, add_generation_prompt=False):
        """The conversation as text, special tokens written as `<s>`/`</s>`, the leading BOS left
        to the tokenizer (as FastChat renders it)."""
        segments = self.segments(messages, system, add_generation_prompt)
        if segments and segments[0].special == "bos":
            segments = segments[1:]
        return "".join(segment_text(s) for s in segments)

    def render_prompt(self, messages, system=None):
        """Text for inference, ending exactly where the assistant's reply starts."""
        return self.render(messages, system, add_generation_prompt=True)

    def encode_prompt(self, tokenizer, messages, system=None):
        """Token ids for inference (BOS and in-text EOS as ids, as in training)."""
        return encode_segments(tokenizer, self.segments(messages, system, add_generation_prompt=True))[0]


def segment_text(segment):
    if segment.special == "bos":
        return BOS_TEXT
    if segment.special == "eos":
        return EOS_TEXT
    return segment.text


class VicunaTemplate(Template):
    """FastChat's vicuna_v1.1: `SYSTEM USER: q ASSISTANT: a</s>USER: ...`; each round ends in EOS."""
    name = "vicuna_v1.1"
    default_system = ("A chat between a curious user and an artificial intelligence assistant. "
                      "The assistant gives helpful, detailed, and polite answers to the user's questions.")

    def round_segments(self, index, system, user, reply):
        head = system + " " if index == 0 else ""
        # The reply's leading space belongs to the reply: with it, the learned span starts right
        # after "ASSISTANT:", the same cut MindFormers' `len(tokens) - 3` lands on.
        out = [Segment(head + "USER: " + user + " ASSISTANT:")]
        if reply is not None:
            out += [Segment(" " + reply, learned=True), Segment(special="eos", learned=True)]
        return out


class Llama2Template(Template):
    """FastChat's llama-2: `[INST] <<SYS>>\\n…\\n<</SYS>>\\n\\nq [/INST] a </s><s>[INST] …`."""
    name = "llama-2"
    default_system = ""

    def round_segments(self, index, system, user, reply):
        out = [] if index == 0 else [Segment(special="bos")]
        if index == 0 and system:
            out.append(Segment("[INST] <<SYS>>\n" + system + "\n<</SYS>>\n\n" + user + " [/INST]"))
        else:
            out.append(Segment("[INST] " + user + " [/INST]"))
        if reply is not None:
            # Meta's chat format tokenizes the space after the answer before EOS.
            out += [Segment(" " + reply + " ", learned=True), Segment(special="eos", learned=True)]
        return out


class ChatMLTemplate(Template):
    """ChatML: `<|im_start|>role\\ncontent<|im_end|>\\n`, then EOS after each reply."""
    name = "chatml"
    default_system = ""

    def round_segments(self, index, system, user, reply):
        head = "<|im_start|>system\n" + system + "<|im_end|>\n" if index == 0 and system else ""
        out = [Segment(head + "<|im_start|>user\n" + user + "<|im_end|>\n<|im_start|>assistant\n")]
        if reply is not None:
            out += [Segment(reply + "<|im_end|>\n", learned=True), Segment(special="eos", learned=True)]
        return out


class AlpacaTemplate(Template):
    """Stanford Alpaca: the user turn is the Alpaca prompt (wrapped in it unless it already is one),
    the reply follows `### Response:` directly, as Alpaca's training script joins them."""
    name = "alpaca"
    default_system = ""

    def round_segments(self, index, system, user, reply):
        prompt = user if "### Response:" in user else alpaca_prompt(user)
        head = system + "\n\n" if index == 0 and system else ""
        out = [Segment(head + prompt)]
        if reply is not None:
            out += [Segment(reply, learned=True), Segment(special="eos", learned=True)]
        return out


class RawTemplate(Template):
    """No wrapper: the user text and the reply are joined as they are; EOS ends each reply."""
    name = "raw"
    default_system = ""

    def round_segments(self, index, system, user, reply):
        out = [Segment((system if index == 0 and system else "") + user)]
        if reply is not None:
            out += [Segment(reply, learned=True), Segment(special="eos", learned=True)]
        return out


class HFChatTemplate(Template):
    """The jinja2 `chat_template` of a HuggingFace `tokenizer_config.json`.

    Reply spans are found by rendering each prefix with the generation prompt and the prefix
    with the reply; a template for which the first is not a prefix of the second is refused.
    """
    name = "hf"

    def __init__(self, tokenizer_config_path):
        import jinja2
        import jinja2.sandbox
        path = os.fspath(tokenizer_config_path)
        config = read_json(path, ConfigError, "tokenizer_config.json", expect=dict)
        source = config.get("chat_template")
        if isinstance(source, list):  # the named-templates form: take "default"
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not isinstance(source, str):
            raise ConfigError(f"{path}: no chat_template to use for template 'hf'")
        self.path = path
        self.bos_text = token_text(config.get("bos_token"), BOS_TEXT)
        self.eos_text = token_text(config.get("eos_token"), EOS_TEXT)
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        self.jinja = env.from_string(source)

    def _render(self, messages, add_generation_prompt):
        return self.jinja.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                 bos_token=self.bos_text, eos_token=self.eos_text)

    def segments(self, messages, system=None, add_generation_prompt=False):
        system, turns = split_system(messages, system)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": m["role"], "content": m["content"]} for m in turns]
        if add_generation_prompt != (turns[-1]["role"] == "user"):
            raise DataError("the prompt must end with a user message" if add_generation_prompt
                            else "conversation ends with a user turn that has no assistant reply")
        text = self._render(messages, add_generation_prompt)
        spans, start = [], 0
        for end in range(len(messages)):
            if messages[end]["role"] != "assistant":
                continue
            before = self._render(messages[:end], True)
            upto = self._render(messages[:end + 1], False)
            if not upto.startswith(before) or not text.startswith(upto):
                raise ConfigError(f"{self.path}: chat_template does not render each turn as a prefix "
                                  "of the next, so reply spans cannot be found")
            spans.append((len(before), len(upto)))
        out = [] if text.startswith(self.bos_text) else [Segment(special="bos")]
        for begin, end in spans:
            out += self._split_special(text[start:begin], False) + self._split_special(text[begin:end], True)
            start = end
        out += self._split_special(text[start:], False)
        return out

    def _split_special(self, text, learned):
        out, rest = [], text
        while rest:
            positions = [(rest.find(t), t, kind) for t, kind in ((self.bos_text, "bos"), (self.eos_text, "eos"))
                         if t and rest.find(t) >= 0]
            if not positions:
                out.append(Segment(rest, learned))
                break
            at, token, kind = min(positions)
            if at:
                out.append(Segment(rest[:at], learned))
            out.append(Segment(special=kind, learned=learned))
            rest = rest[at + len(token):]
        return out

    def render(self, messages, system=None, add_generation_prompt=False):
        text = "".join(segment_text(s) if s.special is None else
                       (self.bos_text if s.special == "bos" else self.eos_text)
                       for s in self.segments(messages, system, add_generation_prompt))
        return text[len(self.bos_text):] if text.startswith(self.bos_text) else text


def token_text(value, default):
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
        value = value.get("content")
    return value if isinstance(value, str) else default


def _raise_template_error(message):
    raise DataError(f"chat_template: {message}")


def encode_segments(tokenizer, segments):
    """Token ids and a learned flag per token, as two lists (see `encode_segment_arrays`)."""
    ids, learned = encode_segment_arrays(tokenizer, segments)
    return ids.tolist(), learned.tolist()


def encode_segment_arrays(tokenizer, segments):
    """Token ids (int32) and a learned flag per token (bool), as arrays. Each run of text between
    special tokens is encoded on its own (as MindFormers encodes each round); a token is learned
    when its UTF-8 byte span overlaps learned text, found from the tokenizer's offsets, never from
    token counts."""
    ids, learned = [], []
    run = []
    for segment in segments + [None]:
        if segment is not None and segment.special is None:
            run.append(segment)
            continue
        if run:
            text = "".join(s.text for s in run)
            spans, offset = [], 0
            for s in run:
                size = len(s.text.encode("utf-8"))
                if s.learned:
                    spans.append((offset, offset + size))
                offset += size
            run_ids, begins, ends = tokenizer.encode_spans(text)
            ids.append(run_ids)
            learned.append(overlap_mask(begins, ends, spans))
            run = []
        if segment is not None:
            ids.append([tokenizer.bos_id if segment.special == "bos" else tokenizer.eos_id])
            learned.append([segment.learned])
    if not ids:
        return np.zeros(0, np.int32), np.zeros(0, bool)
    return np.concatenate(ids).astype(np.int32), np.concatenate(learned).astype(bool)


def overlap_mask(begins, ends, spans):
    """For each token's [begin, end), whether it overlaps any [begin, end) span: a bool array."""
    mask = np.zeros(len(begins), dtype=bool)
    # Token spans are sorted (non-decreasing begins and ends), so each span covers a slice.
    for span_begin, span_end in spans:
        first = np.searchsorted(ends, span_begin, side="right")
        stop = np.searchsorted(begins, span_end, side="left")
        mask[first:stop] = True
    return mask


TEMPLATES = {t.name: t for t in (VicunaTemplate(), Llama2Template(), ChatMLTemplate(),
                                 AlpacaTemplate(), RawTemplate())}
TEMPLATE_NAMES = tuple(TEMPLATES) + ("hf",)


def get_template(name, tokenizer_config_path=None):
    """The template called `name`; `hf` reads the chat_template of `tokenizer_config_path`."""
    if name == "hf":
        if tokenizer_config_path is None:
            raise ConfigError("template 'hf' needs the path of a tokenizer_config.json with a chat_template")
        return HFChatTemplate(tokenizer_config_path)
    if name not in TEMPLATES:
        raise ConfigError(f"unknown template {name!r}; known: {', '.join(TEMPLATE_NAMES)}")
    return TEMPLATES[name]
