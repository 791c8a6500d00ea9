"""What every mindsft tokenizer offers: the interface the templates, preprocessing and predict use.

Two implementations: `SentencePieceTokenizer` (a `tokenizer.model`) and `JsonTokenizer` (a
HuggingFace `tokenizer.json`). Special tokens are named by the templates as "bos", "eos" or by
their text ("<|eot_id|>", "<reserved_106>").
"""
import hashlib

import numpy as np

from mindsft.errors import ConfigError


class Tokenizer:
    """The interface. Attributes every implementation sets:

    path: the file it was loaded from; bos_id, eos_id, unk_id (None when the model has none);
    pad_id (always an id: what records are padded with); end_ids: every id that ends a reply
    (eos first, then the others generation_config.json lists); chat_template: the jinja
    template of its tokenizer_config.json or None; config_path: that file or None;
    parses_special_text: whether special tokens written as text in the input are encoded as
    those tokens (HuggingFace's added tokens), so a conversation is encoded as one text;
    adds_bos: whether the model's own tokenizer puts BOS before a document (Llama's do, Qwen's not).
    """
    path = None
    adds_bos = False
    bos_id = eos_id = unk_id = pad_id = None
    end_ids = ()
    chat_template = None
    config_path = None
    parses_special_text = False

    @property
    def vocab_size(self):
        raise NotImplementedError

    def encode(self, text, add_bos=False, add_eos=False):
        """Token ids of `text`; BOS/EOS only when asked (and only when the model has them)."""
        raise NotImplementedError

    def encode_spans(self, text):
        """(ids, begins, ends) as int64 arrays: each token's byte span in the UTF-8 of `text`.
        Spans are non-decreasing and end at the text's length, so a label mask can be cut on them."""
        raise NotImplementedError

    def encode_in_library(self, texts):
        """The first half of `encode_spans_flat`: what the tokenizer library computes for `texts`,
        without holding the GIL where it can (a thread may run it while another finishes a chunk)."""
        return None

    def encode_spans_flat(self, texts, encoded=None):
        """(ids, begins, ends, lengths, starts): `encode_spans` of each text, the texts one after
        another as one stream: spans count bytes from the start of the first text, text k starts at
        byte starts[k] and has lengths[k] tokens. `encoded`: `encode_in_library(texts)`, if run."""
        encoded = [self.encode_spans(text) for text in texts]
        return concatenated_spans(encoded, [len(text.encode("utf-8")) for text in texts])

    def encode_with_offsets(self, text):
        """Token ids and each token's (begin, end) span in `text`, in bytes of its UTF-8 encoding."""
        ids, begins, ends = self.encode_spans(text)
        return ids.tolist(), list(zip(begins.tolist(), ends.tolist()))

    def decode(self, ids):
        """Text of `ids`, special tokens written out."""
        raise NotImplementedError

    def id_to_piece(self, token_id):
        raise NotImplementedError

    def token_to_id(self, text):
        """Id of the single token spelled `text`, or None."""
        raise NotImplementedError

    def special_id(self, name):
        """Id of a template's special token: "bos", "eos" or a token's text. None for a BOS the
        model does not have (Qwen's); an error naming the token when it is not one token here."""
        if name == "bos":
            return self.bos_id
        if name == "eos":
            if self.eos_id is None:
                raise ConfigError(f"{self.path}: the tokenizer has no eos_token (set it in tokenizer_config.json)")
            return self.eos_id
        token_id = self.token_to_id(name)
        if token_id is None:
            raise ConfigError(f"{self.path}: {name!r} is not a token of this tokenizer; the template "
                              "needs the tokenizer of its model family")
        return token_id

    def sha256(self):
        with open(self.path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()


def concatenated_spans(encoded, text_bytes):
    """`Tokenizer.encode_spans_flat`'s stream from each text's (ids, begins, ends) and byte count."""
    text_bytes = np.asarray(text_bytes, np.int64)
    starts = np.cumsum(text_bytes) - text_bytes
    lengths = np.fromiter((len(ids) for ids, _, _ in encoded), np.int64, len(encoded))
    if not encoded:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, lengths, starts
    shift = np.repeat(starts, lengths)
    return (np.concatenate([ids for ids, _, _ in encoded]).astype(np.int64),
            np.concatenate([b for _, b, _ in encoded]).astype(np.int64) + shift,
            np.concatenate([e for _, _, e in encoded]).astype(np.int64) + shift, lengths, starts)
