"""Tokenizers: one interface (`base.Tokenizer`), a SentencePiece `tokenizer.model` and a HuggingFace
`tokenizer.json`, and `load_tokenizer` that takes either file or a HuggingFace model folder."""
import os

from mindsft.errors import TokenizerError
from mindsft.tokenizer.base import Tokenizer
from mindsft.tokenizer.sentencepiece_model import LlamaTokenizer, SentencePieceTokenizer
from mindsft.tokenizer.tokenizer_json import CONFIG_FILE, TOKENIZER_FILE, JsonTokenizer

SENTENCEPIECE_FILE = "tokenizer.model"

__all__ = ["Tokenizer", "SentencePieceTokenizer", "LlamaTokenizer", "JsonTokenizer", "load_tokenizer",
           "tokenizer_file"]


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


def load_tokenizer(path):
    """The tokenizer of a `tokenizer.model`, a `tokenizer.json` or a HuggingFace folder."""
    file = tokenizer_file(path)
    if file.endswith(".json"):
        return JsonTokenizer(file)
    return SentencePieceTokenizer(file)
