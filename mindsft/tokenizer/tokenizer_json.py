"""A HuggingFace `tokenizer.json` (Llama 3, Qwen2/2.5/3, Mistral, ...) through the `tokenizers`
library, with the special tokens of the `tokenizer_config.json` beside it and the end tokens of
`generation_config.json` when the folder has one.
"""
import itertools
import os
import unicodedata

import numpy as np

from mindsft.errors import ConfigError, TokenizerError
from mindsft.input_files import read_json
from mindsft.tokenizer.base import Tokenizer, concatenated_spans

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Meta reserves this Llama 3.1 token for padding in fine-tuning; used when no pad_token is set.
LLAMA3_PAD_TOKEN = "<|finetune_right_pad_id|>"


def byte_level_alphabet():
    """The characters GPT-2's byte-level BPE spells bytes with (one per byte: `bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [256 + n for n in range(256 - len(printable))]
    return frozenset(map(chr, printable + shifted))


def token_text(value):
    """The text of a special token as tokenizer_config.json writes it (a string or an AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_json_file(path, what):
    return read_json(path, TokenizerError, what, expect=dict)


def read_chat_template(config, folder):
    """The jinja chat template of a tokenizer config (its "default" when it holds several), else the
    `chat_template.jinja` file newer HuggingFace folders keep beside it; None if neither."""
    source = config.get("chat_template")
    if isinstance(source, list):
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if isinstance(source, str):
        return source
    path = os.path.join(folder, CHAT_TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return None


class JsonTokenizer(Tokenizer):
    """Encode and decode with a HuggingFace `tokenizer.json`, as transformers' fast tokenizer does.

    Special tokens written as text (`<|eot_id|>`) are encoded as those tokens, as
    `apply_chat_template` encodes its rendered text; `encode` adds no BOS unless asked.
    """
    parses_special_text = True

    def __init__(self, tokenizer_file, config_file=None):
        from tokenizers import Tokenizer as Backend
        path = os.fspath(tokenizer_file)
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: tokenizer file not found")
        try:
            self.backend = Backend.from_file(path)
        except Exception as err:  # the library raises plain Exceptions for malformed files
            raise TokenizerError(f"{path}: not a readable tokenizer.json ({err})") from None
        folder = os.path.dirname(os.path.abspath(path))
        if config_file is None and os.path.isfile(os.path.join(folder, CONFIG_FILE)):
            config_file = os.path.join(folder, CONFIG_FILE)
        config = {}
        special_map = os.path.join(folder, SPECIAL_TOKENS_MAP_FILE)
        if os.path.isfile(special_map):
            config.update(read_json_file(special_map, "special tokens map"))
        if config_file is not None:
            config.update(read_json_file(config_file, "tokenizer config"))
        self.config_path = None if config_file is None else os.fspath(config_file)
        self._set_up(path, config, read_chat_template(config, folder), folder)

    def _set_up(self, path, config, chat_template, folder):
        """The special tokens and end ids of `self.backend`, from a tokenizer config mapping (also
        used by the tokenizers built in memory from other files: tiktoken, vocab.json + merges.txt)."""
        self.path = path
        self.config = config
        self.chat_template = chat_template
        self.added = {t.content: i for i, t in self.backend.get_added_tokens_decoder().items()}

        self.bos_text = token_text(config.get("bos_token"))
        if "bos_token" not in config:
            # A bare tokenizer.json: the BOS its post-processor puts before a text, if any.
            first = self.backend.encode("", add_special_tokens=True).ids
            self.bos_text = self.backend.id_to_token(first[0]) if first else None
        self.eos_text = token_text(config.get("eos_token"))
        self.bos_id, self.eos_id = self._id_of(self.bos_text), self._id_of(self.eos_text)
        unk = token_text(config.get("unk_token"))
        self.unk_id = self._id_of(unk)
        pad = token_text(config.get("pad_token"))
        if pad is None and LLAMA3_PAD_TOKEN in self.added:
            pad = LLAMA3_PAD_TOKEN
        self.pad_id = next((i for i in (self._id_of(pad), self.unk_id, self.eos_id) if i is not None), 0)
        self.end_ids = tuple(self._end_ids(folder))
        opening = self.backend.encode("", add_special_tokens=True).ids[:1]
        self.adds_bos = self.bos_id is not None and opening == [self.bos_id]
        self._lengths = None  # built on first encode_spans: a process that only reads ids skips it
        normalizer = self.backend.normalizer
        self._normalizer = None if normalizer is None else type(normalizer).__name__

    def _id_of(self, text):
        return None if text is None else self.backend.token_to_id(text)

    def _end_ids(self, folder):
        ids = [] if self.eos_id is None else [self.eos_id]
        path = os.path.join(folder, GENERATION_CONFIG_FILE)
        if os.path.isfile(path):
            listed = read_json_file(path, "generation config").get("eos_token_id")
            for token_id in listed if isinstance(listed, list) else [listed]:
                if isinstance(token_id, int) and token_id not in ids:
                    ids.append(token_id)
        return ids

    @property
    def _token_bytes(self):
        if self._lengths is None:
            self._lengths = self._byte_level_lengths()
        return self._lengths if self._lengths is not False else None

    def _byte_level_lengths(self):
        """Bytes of text each token stands for, when every token of a byte-level BPE spells its bytes
        one character each; False for other models (their spans come from the library's offsets)."""
        vocab = self.backend.get_vocab(with_added_tokens=False)
        # One set of all the characters, not a check per token: ~0.2 s less on Llama 3's 128k tokens.
        if not byte_level_alphabet().issuperset("".join(vocab)):
            return False
        lengths = np.zeros(self.backend.get_vocab_size(with_added_tokens=True), dtype=np.int64)
        lengths[np.fromiter(vocab.values(), np.int64, len(vocab))] = np.fromiter(map(len, vocab), np.int64, len(vocab))
        for text, token_id in self.added.items():
            lengths[token_id] = len(text.encode("utf-8"))
        return lengths

    @property
    def vocab_size(self):
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text, add_bos=False, add_eos=False):
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def encode_spans(self, text):
        """Byte spans as running sums of token lengths when the text reaches the model unchanged (a
        byte-level BPE spells it byte for byte); else from the library's character offsets. Both
        tile the text: a token spans from the previous token's end to its own."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        return self._length_spans(text, ids) or (ids, *self._offset_spans(text, encoding))

    def encode_spans_batch(self, texts):
        """`encode_spans` of each text, encoded in one call (without offsets where lengths suffice)."""
        if self._token_bytes is None:
            return [self.encode_spans(text) for text in texts]
        out = []
        # encode_batch_fast (tokenizers >= 0.21) skips the offsets this path does not read.
        encode_batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        for text, encoding in zip(texts, encode_batch(texts, add_special_tokens=False)):
            out.append(self._length_spans(text, np.asarray(encoding.ids, dtype=np.int64)) or self.encode_spans(text))
        return out

    def encode_in_library(self, texts):
        """The library's encodings of `texts` in one call, which does not hold the GIL; None where
        `encode_spans_flat` takes the library's offsets text by text."""
        # Before the vocabulary's byte lengths are known (a thread encodes the first chunk while they
        # are built), the encodings are made without offsets: a model found not byte-level is
        # encoded again, text by text, with them.
        if self._lengths is False or not all(map(self._text_unchanged, texts)):
            return None
        # encode_batch_fast (tokenizers >= 0.21) skips the offsets this path does not read.
        encode_batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return encode_batch(texts, add_special_tokens=False)

    def encode_spans_flat(self, texts, encoded=None):
        """`Tokenizer.encode_spans_flat`, the spans of the whole stream as one running sum of token
        lengths when every text's lengths add up to its bytes (else text by text)."""
        text_bytes = [len(text.encode("utf-8")) for text in texts]
        encodings = self.encode_in_library(texts) if encoded is None else encoded
        if encodings is None or self._token_bytes is None:
            return concatenated_spans(self.encode_spans_batch(texts), text_bytes)
        id_lists = [encoding.ids for encoding in encodings]
        lengths = np.fromiter(map(len, id_lists), np.int64, len(id_lists))
        ids = np.fromiter(itertools.chain.from_iterable(id_lists), np.int64, int(lengths.sum()))
        token_bytes = self._token_bytes[ids]
        ends = np.cumsum(token_bytes)
        begins = ends - token_bytes
        text_ends = np.cumsum(text_bytes, dtype=np.int64)
        # Each text's tokens must end exactly where it ends (as `_length_spans` checks per text);
        # a text where they do not (an added token that strips spaces) takes the library's offsets.
        if not np.array_equal(np.concatenate(([0], ends))[np.cumsum(lengths)], text_ends):
            per_text = np.split(ids, np.cumsum(lengths)[:-1])
            return concatenated_spans([self._length_spans(text, text_ids) or self.encode_spans(text)
                                       for text, text_ids in zip(texts, per_text)], text_bytes)
        return ids, begins, ends, lengths, text_ends - np.asarray(text_bytes, np.int64)

    def _length_spans(self, text, ids):
        """(ids, begins, ends) from token lengths, or None when they cannot be trusted for `text`."""
        if not len(ids):
            return ids, ids, ids
        if self._token_bytes is None or not self._text_unchanged(text):
            return None
        ends = np.cumsum(self._token_bytes[ids])
        # Lengths that add up prove the spans: an added token that strips spaces would not.
        if ends[-1] != len(text.encode("utf-8")):
            return None
        return ids, np.concatenate(([0], ends[:-1])), ends

    def _text_unchanged(self, text):
        if self._normalizer is None:
            return True
        return self._normalizer == "NFC" and unicodedata.is_normalized("NFC", text)

    @staticmethod
    def _offset_spans(text, encoding):
        # The library's offsets count characters (and have been wrong for some merges of Llama 3's
        # vocabulary, hence the path above): turn them into bytes, then make them tile the text.
        code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
        byte_at = np.concatenate(([0], np.cumsum(widths)))
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        ends = np.maximum.accumulate(byte_at[offsets[:, 1]])
        # Text a normalizer folded away at the end (a combining accent NFC composed) is the last token's.
        ends[-1] = byte_at[-1]
        return np.concatenate(([0], ends[:-1])), ends

    def decode(self, ids):
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, token_id):
        return self.backend.id_to_token(int(token_id))

    def token_to_id(self, text):
        return self.backend.token_to_id(text)

    def special_text(self, name):
        """How a template's special token ("bos", "eos" or a token's text) is written in the text
        this tokenizer encodes; None for a BOS the model does not have."""
        if name == "bos":
            return self.bos_text if self.bos_id is not None else None
        if name == "eos":
            if self.eos_id is None:
                raise ConfigError(f"{self.path}: the tokenizer has no eos_token (set it in {CONFIG_FILE})")
            return self.eos_text
        if name not in self.added:
            raise ConfigError(f"{self.path}: {name!r} is not a special token of this tokenizer; the template "
                              "needs the tokenizer of its model family")
        return name
