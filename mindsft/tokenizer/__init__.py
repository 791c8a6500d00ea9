"""Tokenizers: one interface (`base.Tokenizer`), a SentencePiece or tiktoken `tokenizer.model`, a
HuggingFace `tokenizer.json`, Qwen2's `vocab.json` + `merges.txt`, and `load_tokenizer` that takes
any of them or a HuggingFace model folder."""
import os

from mindsft.errors import TokenizerError
from mindsft.tokenizer.base import Tokenizer
from mindsft.tokenizer.sentencepiece_model import LlamaTokenizer, SentencePieceTokenizer
from mindsft.tokenizer.tokenizer_json import CONFIG_FILE, TOKENIZER_FILE, JsonTokenizer
from mindsft.tokenizer.bpe_vocab_merges import VocabMergesTokenizer
from mindsft.tokenizer.tiktoken_model import TiktokenTokenizer, is_tiktoken_file

SENTENCEPIECE_FILE = "tokenizer.model"

__all__ = ["Tokenizer", "SentencePieceTokenizer", "LlamaTokenizer", "JsonTokenizer", "TiktokenTokenizer",
           "VocabMergesTokenizer", "load_tokenizer", "tokenizer_file"]


def tokenizer_file(path):
    """The tokenizer file `path` names: itself, or in a folder its `tokenizer.model` (the original of
    a Llama 2 / Mistral / Baichuan folder, whose tokenizer.json is a conversion of it), else its
    `tokenizer.json`. An error that says what to pass otherwise."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in (SENTENCEPIECE_FILE, TOKENIZER_FILE):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise TokenizerError(f"{path}: holds neither {SENTENCEPIECE_FILE} nor {TOKENIZER_FILE}")
    if not os.path.isfile(path):
        raise TokenizerError(f"{path}: tokenizer file not found (pass a {SENTENCEPIECE_FILE}, a {TOKENIZER_FILE} "
                             "or a HuggingFace model folder)")
    if os.path.basename(path) == CONFIG_FILE:
        raise TokenizerError(f"{path}: a tokenizer config, not a tokenizer: pass the {TOKENIZER_FILE} "
                             "beside it or its folder")
    return path


def load_tokenizer(path, merges_file=None):
    """The tokenizer of a `tokenizer.model` (SentencePiece or tiktoken, told apart by content), a
    `tokenizer.json`, a HuggingFace folder, or a `vocab.json` with its `merges_file`."""
    if merges_file:
        return VocabMergesTokenizer(path, merges_file)
    file = tokenizer_file(path)
    if file.endswith(".json"):
        if os.path.basename(file) != TOKENIZER_FILE and _is_vocab_json(file):
            raise TokenizerError(f"{file}: a vocab.json needs its merges.txt (--merges_file, or "
                                 "processor.tokenizer.merges_file)")
        return JsonTokenizer(file)
    if is_tiktoken_file(file):
        return TiktokenTokenizer(file)
    return SentencePieceTokenizer(file)


def _is_vocab_json(path):
    with open(path, "rb") as f:
        return b'"model"' not in f.read(1 << 16)
