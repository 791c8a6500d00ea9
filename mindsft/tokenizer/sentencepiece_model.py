"""The SentencePiece tokenizer (`tokenizer.model`: Llama 2, Baichuan2, Mistral v1-v3)."""
import os

import numpy as np
import sentencepiece as spm

from mindsft.errors import TokenizerError
from mindsft.protowire import parse_fields
from mindsft.tokenizer.base import Tokenizer


class SentencePieceTokenizer(Tokenizer):
    """Encode and decode with a SentencePiece `tokenizer.model`.

    The pad id is the model's pad piece, or 0 (`<unk>`) when it has none, as MindFormers pads.
    Special tokens in the text are not parsed (sentencepiece encodes `</s>` as characters), so
    templates hand BOS/EOS and other control pieces over as ids.
    """

    def __init__(self, model_file):
        model_file = os.fspath(model_file)
        if not os.path.isfile(model_file):
            raise TokenizerError(f"{model_file}: tokenizer file not found (pass the Llama tokenizer.model)")
        self.path = self.model_file = model_file
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_file)
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{model_file}: not a readable SentencePiece model ({err})") from None
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        self.end_ids = (self.eos_id,) if self.eos_id >= 0 else ()
        self.adds_bos = self.bos_id >= 0
        self._piece_bytes = self._is_byte = self._exact_pieces = None  # built on first encode_spans

    @property
    def vocab_size(self):
        return self.sp.GetPieceSize()

    def encode(self, text, add_bos=False, add_eos=False):
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_spans(self, text):
        """(ids, begins, ends) as int64 arrays: each token's byte span in the UTF-8 of `text`.

        A byte-fallback piece spans its own byte (sentencepiece gives the whole character to the
        last byte piece and empty spans to the others, which would leave the first bytes of a
        character outside a span that starts at that character).
        """
        if self._piece_bytes is None:
            self._piece_bytes, self._is_byte, self._exact_pieces = self._piece_tables()
        if self._exact_pieces:
            spans = self._piece_length_spans(text)
            if spans is not None:
                return spans
        return self._offset_mapping_spans(text)

    def _piece_tables(self):
        """Bytes of text each piece stands for, which pieces are bytes, and whether piece lengths
        alone give exact spans: true when the model does not normalize the text (Llama's
        `identity` normalizer), so the pieces spell the text with each space as a `▁`."""
        name, self._dummy_prefix, remove_extra_whitespaces = self._normalizer_spec()
        exact = name == "identity" and not remove_extra_whitespaces
        size = self.sp.GetPieceSize()
        lengths = np.zeros(size, dtype=np.int64)
        is_byte = np.zeros(size, dtype=bool)
        for i in range(size):
            if self.sp.IsByte(i):
                lengths[i], is_byte[i] = 1, True
            elif not (self.sp.IsControl(i) or self.sp.IsUnknown(i)):
                lengths[i] = len(self.sp.IdToPiece(i).replace("\u2581", " ").encode("utf-8"))
        return lengths, is_byte, exact

    def _normalizer_spec(self):
        """(name, add_dummy_prefix, remove_extra_whitespaces) of the model's NormalizerSpec (field 3
        of ModelProto), read off the wire: protobuf's pure-Python runtime, which MindSpore
        selects, takes ~0.8 s to parse the whole model."""
        name, dummy_prefix, remove_extra_whitespaces = "", 1, 1  # proto2 defaults
        for number, value in parse_fields(self.sp.serialized_model_proto()):
            if number != 3:
                continue
            for spec_number, spec_value in parse_fields(value):
                if spec_number == 1:
                    name = bytes(spec_value).decode("utf-8")
                elif spec_number == 3:
                    dummy_prefix = int(spec_value)
                elif spec_number == 4:
                    remove_extra_whitespaces = int(spec_value)
        return name, dummy_prefix, remove_extra_whitespaces

    def _piece_length_spans(self, text):
        """Spans as running sums of piece lengths (~1.6x faster than sentencepiece's offset
        mapping); None when they do not add up to the text (an unknown piece), to fall back."""
        ids = np.asarray(self.sp.EncodeAsIds(text), dtype=np.int64)
        if not len(ids):
            return ids, ids, ids
        # The dummy prefix `▁` sentencepiece puts before the text stands for no byte of it.
        ends = np.cumsum(self._piece_bytes[ids]) - self._dummy_prefix
        if ends[-1] != len(text.encode("utf-8")):
            return None
        np.maximum(ends, 0, out=ends)
        begins = np.empty_like(ends)
        begins[0] = 0
        begins[1:] = ends[:-1]
        return ids, begins, ends

    def _offset_mapping_spans(self, text):
        # sentencepiece's C++ offset mapping, not its 'proto' output: once MindSpore is imported
        # protobuf runs in pure Python, and parsing the proto is then ~30x slower.
        out = self.sp.encode(text, return_type="offset_mapping", return_bytes=True)
        ids = np.asarray(out["ids"], dtype=np.int64)
        spans = np.asarray(out["offsets"], dtype=np.int64).reshape(-1, 2)
        begins, ends = spans[:, 0].copy(), spans[:, 1].copy()
        for k in np.flatnonzero(self._is_byte[ids]):
            begins[k] = ends[k - 1] if k else 0
            ends[k] = begins[k] + 1
        return ids, begins, ends

    def decode(self, ids):
        return self.sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, token_id):
        return self.sp.IdToPiece(int(token_id))

    def token_to_id(self, text):
        token_id = self.sp.PieceToId(text)
        # PieceToId answers unk for a piece it does not have.
        return None if token_id == self.unk_id and text != self.sp.IdToPiece(self.unk_id) else token_id


# The name MindFormers' configs use (processor.tokenizer.type: LlamaTokenizer).
LlamaTokenizer = SentencePieceTokenizer
