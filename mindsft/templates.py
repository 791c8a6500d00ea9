"""The prompt-template registry: one place that turns a conversation into text and tokens.

A template lays a conversation out as a list of `Segment`s: plain text that the model reads
(`learned=False`), reply text that it learns (`learned=True`), and special tokens (BOS, EOS or a
control token such as `<|eot_id|>`). Training data, the rendered text and the inference prompt
all come from the same segments, so the prompt the model is asked at predict time is byte for
byte the text it was trained on before each reply. The token that ends each reply is learned.

Messages are `[{"role": "user" | "assistant" | "system", "content": str}]`: an optional system
message first, then user and assistant turns alternating, starting with the user. The `hf`
template also takes what its jinja template reads (tools, tool calls, reasoning).
"""
import functools
import json
import os
import typing

import numpy as np

from mindsft.errors import ConfigError, DataError, MindsftError
from mindsft.tokenizer.tokenizer_json import read_chat_template, read_json_file, token_text

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


class Segment(typing.NamedTuple):
    """A run of text, or a special token (`special` = "bos" | "eos" | the token's text, e.g.
    "<|eot_id|>"), learned or not. A named tuple: a frozen dataclass took ~0.3 s to build the
    segments of 21k records."""
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
    """Base: subclasses say how one round (user turn, assistant reply) is laid out.

    bos: the special token that opens a conversation (None: nothing); end_token: the special
    token that ends a reply, at which generation stops.
    """
    name = None
    default_system = None
    bos = "bos"
    end_token = "eos"

    def round_segments(self, index, system, user, reply):
        """Segments of round `index`; `reply` is None for the generation prompt."""
        raise NotImplementedError

    def segments(self, messages, system=None, add_generation_prompt=False, tools=None):
        """The whole conversation as segments. With `add_generation_prompt` the last message must
        be a user turn and the segments end where the assistant's reply starts."""
        if tools:
            raise DataError(f"the record has tools, which template {self.name!r} cannot write "
                            "(use --template hf with a chat_template that takes tools)")
        system, turns = split_system(messages, system)
        if system is None:
            system = self.default_system
        last_is_user = len(turns) % 2 == 1
        if add_generation_prompt and not last_is_user:
            raise DataError("the prompt must end with a user message")
        if not add_generation_prompt and last_is_user:
            raise DataError("conversation ends with a user turn that has no assistant reply")
        out = [Segment(special=self.bos)] if self.bos else []
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
    return segment.text if segment.special is None else segment.special


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


@functools.lru_cache(maxsize=None)
def _header(role):
    """Llama 3's `<|start_header_id|>role<|end_header_id|>\n\n` (segments are immutable: one list
    per role, copied by the `+` that uses it)."""
    return [Segment(special="<|start_header_id|>"), Segment(role),
            Segment(special="<|end_header_id|>"), Segment("\n\n")]


class Llama3Template(Template):
    """Llama 3's chat format, as its tokenizer's chat_template renders it: each message as
    `<|start_header_id|>role<|end_header_id|>\n\n` + content (trimmed) + `<|eot_id|>`."""
    name = "llama3"
    bos = "<|begin_of_text|>"
    end_token = "<|eot_id|>"

    def round_segments(self, index, system, user, reply):
        out = []
        if index == 0 and system is not None:
            out += _header("system") + [Segment(system.strip()), Segment(special=self.end_token)]
        out += _header("user") + [Segment(user.strip()), Segment(special=self.end_token)] + _header("assistant")
        if reply is not None:
            out += [Segment(reply.strip(), learned=True), Segment(special=self.end_token, learned=True)]
        return out


def _chatml_turn(role, content):
    return [Segment(special="<|im_start|>"), Segment(role + "\n" + content), Segment(special="<|im_end|>"),
            Segment("\n")]


class QwenTemplate(Template):
    """Qwen2.5's ChatML: `<|im_start|>role\ncontent<|im_end|>\n`, with Qwen2.5's default system
    turn when the conversation has none; a reply and its `<|im_end|>` are learned."""
    name = "qwen"
    default_system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    bos = None
    end_token = "<|im_end|>"

    def round_segments(self, index, system, user, reply):
        out = _chatml_turn("system", system) if index == 0 else []
        out += _chatml_turn("user", user) + [Segment(special="<|im_start|>"), Segment("assistant\n")]
        if reply is not None:
            out += [Segment(reply, learned=True), Segment(special=self.end_token, learned=True), Segment("\n")]
        return out


class MistralTemplate(Template):
    """Mistral's `[INST] q[/INST] a</s>` (the chat_template of Mistral 7B Instruct v0.3, whose
    tokenizer has `[INST]`/`[/INST]` as control tokens); the reply is trimmed and follows a space.

    One difference, on purpose: Mistral's template puts a system message before the last user
    turn only, so a trained conversation would never show it; here it opens the first user turn
    (as mistral_common's v1 tokenizer does), and the prompt is the text trained on.
    """
    name = "mistral"
    default_system = ""
    # The spaces around [INST] are written for a tokenizer.json, which reads the text whole; a
    # SentencePiece model encodes each run with a dummy-prefix space of its own.
    needs_tokenizer_json = True

    def round_segments(self, index, system, user, reply):
        head = system + "\n\n" if index == 0 and system else ""
        out = [Segment(special="[INST]"), Segment(" " + head + user), Segment(special="[/INST]")]
        if reply is not None:
            out += [Segment(" " + reply.strip(), learned=True), Segment(special="eos", learned=True)]
        return out


class Baichuan2Template(Template):
    """Baichuan2-Chat: the system text, then `<reserved_106>` question `<reserved_107>` answer per
    round (the user and assistant tokens of Baichuan2's generation_config), no BOS, as Baichuan2's
    own fine-tune.py lays out a conversation; each answer ends in EOS, which is learned."""
    name = "baichuan2"
    default_system = ""
    bos = None

    def round_segments(self, index, system, user, reply):
        out = [Segment(system)] if index == 0 and system else []
        out += [Segment(special="<reserved_106>"), Segment(user), Segment(special="<reserved_107>")]
        if reply is not None:
            out += [Segment(reply, learned=True), Segment(special="eos", learned=True)]
        return out


class _GenerationTag:
    """Builds the jinja extension for HuggingFace's `{% generation %}...{% endgeneration %}`
    marker (transformers uses it for assistant masks): here it renders its body unchanged."""

    @staticmethod
    def extension():
        import jinja2.ext
        import jinja2.nodes

        class GenerationTag(jinja2.ext.Extension):
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller):
                return caller()

        return GenerationTag


def compile_chat_template(source):
    """A jinja chat template compiled in the environment transformers renders it in (sandboxed,
    trimmed blocks, its `tojson`, `raise_exception` and `strftime_now`, loop controls)."""
    import datetime

    import jinja2.ext
    import jinja2.sandbox

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers' does not.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag.extension(), jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


# Names a message's reasoning comes under; transformers gives a template all of the first two.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def template_messages(messages):
    """Messages as transformers hands them to a chat template: keys whose value is None dropped,
    reasoning under `reasoning_content` and `thinking` alike."""
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def check_hf_messages(messages, add_generation_prompt):
    """Roles and content types of a conversation for a jinja template (tool turns allowed)."""
    if not messages:
        raise DataError("empty conversation")
    for position, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise DataError(f"message {position}: unknown role {role!r}")
        content = message.get("content")
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise DataError(f"message {position}: content is {type(content).__name__}, not a string")
    last = messages[-1]["role"]
    if add_generation_prompt and last == "assistant":
        raise DataError("the prompt must end with a user message")
    if not add_generation_prompt and last != "assistant":
        raise DataError("conversation ends with a user turn that has no assistant reply")


class HFChatTemplate(Template):
    """The jinja2 `chat_template` of a HuggingFace tokenizer, rendered as transformers renders it.

    A reply starts where the text rendered up to it with the generation prompt ends (a template
    for which that text does not open the conversation is refused), and runs through the first
    end token after it (the tokenizer's eos or any end id of generation_config.json), so the
    turn-ending token is learned; a template that writes none ends it where the text rendered
    through the reply ends.
    """
    name = "hf"

    def __init__(self, tokenizer_config_path=None, tokenizer=None):
        if tokenizer_config_path is None and tokenizer is not None:
            tokenizer_config_path = tokenizer.config_path
        if tokenizer_config_path is None and getattr(tokenizer, "chat_template", None):
            # A tokenizer built from files without a config (Qwen2's vocab.json + merges.txt)
            # carries its own template and special tokens.
            config, folder = dict(tokenizer.config, chat_template=tokenizer.chat_template), None
            path = tokenizer.path
        elif tokenizer_config_path is None:
            raise ConfigError("template 'hf' needs the path of a tokenizer_config.json with a chat_template "
                              "(--tokenizer_config, or a tokenizer.json with its tokenizer_config.json beside it)")
        else:
            path = os.fspath(tokenizer_config_path)
            try:
                config = read_json_file(path, "tokenizer config")
            except MindsftError as err:
                raise ConfigError(str(err)) from None
            folder = os.path.dirname(os.path.abspath(path))
        source = read_chat_template(config, folder)
        if not isinstance(source, str):
            raise ConfigError(f"{path}: no chat_template to use for template 'hf'")
        # The config file the template came from (recorded with the data, so predict renders the
        # same), None when it is the tokenizer's own; `where` names it in messages.
        self.path, self.where = (path if folder is not None else None), path
        self.special_tokens = {key: token_text(config.get(key)) for key in SPECIAL_TOKEN_KEYS
                               if token_text(config.get(key)) is not None}
        self.bos_text = self.special_tokens.get("bos_token")
        self.eos_text = self.special_tokens.get("eos_token", EOS_TEXT)
        end_texts = [self.eos_text]
        if tokenizer is not None:
            end_texts += [tokenizer.id_to_piece(i) for i in tokenizer.end_ids]
        self.end_texts = tuple(dict.fromkeys(t for t in end_texts if t))
        # A SentencePiece record starts with BOS (as MindFormers' do) even when the template does not
        # write one; a tokenizer.json's ids stay exactly apply_chat_template's.
        self.adds_missing_bos = tokenizer is None or not tokenizer.parses_special_text
        self.jinja = compile_chat_template(source)

    def _render(self, messages, add_generation_prompt, tools=None):
        return self.jinja.render(messages=messages, tools=tools, documents=None,
                                 add_generation_prompt=add_generation_prompt, **self.special_tokens)

    def _prepare(self, messages, system, add_generation_prompt):
        messages = template_messages(messages)
        if system is not None:
            rest = messages[1:] if messages and messages[0].get("role") == "system" else messages
            messages = [{"role": "system", "content": system}] + rest
        check_hf_messages(messages, add_generation_prompt)
        return messages

    def segments(self, messages, system=None, add_generation_prompt=False, tools=None):
        messages = self._prepare(messages, system, add_generation_prompt)
        text = self._render(messages, add_generation_prompt, tools)
        begins = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if index == 0:
                raise DataError("message 0: a conversation cannot open with an assistant turn")
            before = self._render(messages[:index], True, tools)
            if not text.startswith(before):
                raise ConfigError(f"{self.where}: chat_template does not render the text before reply {index} "
                                  "as the start of the whole conversation, so reply spans cannot be found")
            begins.append((index, len(before)))
        spans = []
        for number, (index, begin) in enumerate(begins):
            limit = begins[number + 1][1] if number + 1 < len(begins) else len(text)
            found = [(at, len(t)) for t in self.end_texts for at in [text.find(t, begin, limit)] if at >= 0]
            if found:
                at, size = min(found)
                spans.append((begin, at + size))
                continue
            upto = self._render(messages[:index + 1], False, tools)
            if not text.startswith(upto) or len(upto) < begin:
                raise ConfigError(f"{self.where}: reply {index} ends with none of {', '.join(self.end_texts)} "
                                  "and the template does not render the conversation up to it as a prefix")
            spans.append((begin, len(upto)))
        missing_bos = self.adds_missing_bos and self.bos_text and not text.startswith(self.bos_text)
        out, start = [Segment(special="bos")] if missing_bos else [], 0
        for begin, end in spans:
            out += self._split_special(text[start:begin], False) + self._split_special(text[begin:end], True)
            start = end
        out += self._split_special(text[start:], False)
        return out

    def _split_special(self, text, learned):
        """Segments of rendered text, BOS and EOS written as text turned into special segments (so a
        SentencePiece tokenizer, which reads `</s>` as characters, gets their ids)."""
        specials = [(t, kind) for t, kind in ((self.bos_text, "bos"), (self.eos_text, "eos")) if t]
        out, rest = [], text
        while rest:
            positions = [(rest.find(t), t, kind) for t, kind in specials if rest.find(t) >= 0]
            if not positions:
                out.append(Segment(rest, learned))
                break
            at, token, kind = min(positions)
            if at:
                out.append(Segment(rest[:at], learned))
            out.append(Segment(special=kind, learned=learned))
            rest = rest[at + len(token):]
        return out

    def render(self, messages, system=None, add_generation_prompt=False, tools=None):
        """The text as the chat template renders it (transformers' `tokenize=False` output)."""
        return self._render(self._prepare(messages, system, add_generation_prompt), add_generation_prompt, tools)

    def encode_prompt(self, tokenizer, messages, system=None, tools=None):
        return encode_segments(tokenizer, self.segments(messages, system, add_generation_prompt=True, tools=tools))[0]


def _raise_template_error(message):
    raise DataError(f"chat_template: {message}")


def encode_segments(tokenizer, segments):
    """Token ids and a learned flag per token, as two lists (see `encode_segment_arrays`)."""
    ids, learned = encode_segment_arrays(tokenizer, segments)
    return ids.tolist(), learned.tolist()


def encode_segment_arrays(tokenizer, segments):
    """Token ids (int32) and a learned flag per token (bool), as arrays. A token is learned when its
    UTF-8 byte span overlaps learned text, found from the tokenizer's offsets, never from token counts.

    A tokenizer that reads special tokens written as text (a tokenizer.json) encodes the whole
    conversation as one text, as `apply_chat_template` does. Otherwise (SentencePiece) each run of
    text between special tokens is encoded on its own (as MindFormers encodes each round) and the
    special tokens go in as ids.
    """
    if tokenizer.parses_special_text:
        return _encode_as_one_text(tokenizer, segments)
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
            token_id = tokenizer.special_id(segment.special)
            if token_id is not None:
                ids.append([token_id])
                learned.append([segment.learned])
    if not ids:
        return np.zeros(0, np.int32), np.zeros(0, bool)
    return np.concatenate(ids).astype(np.int32), np.concatenate(learned).astype(bool)


def _encode_as_one_text(tokenizer, segments):
    text, spans = one_text(tokenizer, segments)
    ids, begins, ends = tokenizer.encode_spans(text)
    return ids.astype(np.int32), overlap_mask(begins, ends, spans)


def one_text(tokenizer, segments):
    """The conversation as one text (special tokens written as text) and its learned byte spans."""
    pieces, learned = [], []
    for segment in segments:
        text = segment.text if segment.special is None else tokenizer.special_text(segment.special)
        if text:
            pieces.append(text)
            learned.append(segment.learned)
    joined = "".join(pieces)
    # An ASCII text has a byte per character: no piece needs encoding to be measured.
    sizes = map(len, pieces) if joined.isascii() else (len(text.encode("utf-8")) for text in pieces)
    spans, offset = [], 0
    for size, is_learned in zip(sizes, learned):
        if is_learned:
            if spans and spans[-1][1] == offset:
                spans[-1] = (spans[-1][0], offset + size)
            else:
                spans.append((offset, offset + size))
        offset += size
    return joined, spans


def overlap_mask(begins, ends, spans):
    """For each token's [begin, end), whether it overlaps any [begin, end) span: a bool array."""
    mask = np.zeros(len(begins), dtype=bool)
    # Token spans are sorted (non-decreasing begins and ends), so each span covers a slice.
    for span_begin, span_end in spans:
        first = np.searchsorted(ends, span_begin, side="right")
        stop = np.searchsorted(begins, span_end, side="left")
        mask[first:stop] = True
    return mask


TEMPLATES = {t.name: t for t in (VicunaTemplate(), Llama2Template(), ChatMLTemplate(), AlpacaTemplate(),
                                 RawTemplate(), Llama3Template(), QwenTemplate(), MistralTemplate(),
                                 Baichuan2Template())}
TEMPLATE_NAMES = tuple(TEMPLATES) + ("hf",)


def get_template(name, tokenizer_config_path=None, tokenizer=None):
    """The template called `name`; `hf` reads the chat_template of `tokenizer_config_path`, else of
    the tokenizer's own tokenizer_config.json, and ends replies at the tokenizer's end tokens."""
    if name == "hf":
        return HFChatTemplate(tokenizer_config_path, tokenizer)
    if name not in TEMPLATES:
        raise ConfigError(f"unknown template {name!r}; known: {', '.join(TEMPLATE_NAMES)}")
    return TEMPLATES[name]


def check_template_tokens(template, tokenizer):
    """Fail early, naming the token, when `tokenizer` lacks a special token `template` writes."""
    if isinstance(template, HFChatTemplate):
        return
    if getattr(template, "needs_tokenizer_json", False) and not tokenizer.parses_special_text:
        raise ConfigError(f"{tokenizer.path}: template {template.name!r} needs the model's tokenizer.json "
                          "(pass it, not the tokenizer.model beside it)")
    probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "a"}]
    for segment in template.segments(probe):
        if segment.special is not None:
            if tokenizer.parses_special_text:
                tokenizer.special_text(segment.special)
            else:
                tokenizer.special_id(segment.special)
