"""The Llama SentencePiece tokenizer (`tokenizer.model`)."""
import hashlib
import os

import sentencepiece as spm

from mindsft.errors import TokenizerError


class LlamaTokenizer:
    """Encode and decode with a Llama `tokenizer.model`.

    The pad id is the model's pad piece, or 0 (`<unk>`) when it has none, as MindFormers pads.
    """

    def __init__(self, model_file):
        model_file = os.fspath(model_file)
        if not os.path.isfile(model_file):
            raise TokenizerError(f"{model_file}: tokenizer file not found (pass the Llama tokenizer.model)")
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_file)
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{model_file}: not a readable SentencePiece model ({err})") from None
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0

    @property
    def vocab_size(self):
        return self.sp.GetPieceSize()

    def encode(self, text, add_bos=False, add_eos=False):
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_with_offsets(self, text):
        """Token ids and each token's (begin, end) span in `text`, in bytes of its UTF-8 encoding."""
        # sentencepiece's C++ offset mapping, not its 'proto' output: once MindSpore is imported
        # protobuf runs in pure Python, and parsing the proto is then ~30x slower.
        out = self.sp.encode(text, return_type="offset_mapping", return_bytes=True)
        return list(out["ids"]), [tuple(span) for span in out["offsets"]]

    def decode(self, ids):
        return self.sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, token_id):
        return self.sp.IdToPiece(int(token_id))

    def sha256(self):
        with open(self.model_file, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
