"""LlamaTokenizer is sentencepiece with Llama's conventions."""
import pytest
import sentencepiece as spm

from conftest import shared_file
from mindsft.errors import TokenizerError
from mindsft.tokenizer import LlamaTokenizer


def test_llama2_tokenizer_matches_sentencepiece():
    path = shared_file("tokenizers/llama2/tokenizer.model")
    tokenizer = LlamaTokenizer(path)
    assert tokenizer.encode("Hello world!") == [15043, 3186, 29991]
    reference = spm.SentencePieceProcessor(model_file=str(path))
    text = "  Two spaces, unicode é 中文 and\nnewlines."
    assert tokenizer.encode(text) == reference.encode(text)
    assert tokenizer.encode("Hi", add_bos=True, add_eos=True) == [1] + reference.encode("Hi") + [2]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.pad_id) == (1, 2, 0, 0)


def test_offsets_are_utf8_byte_spans(tiny_hf_dir):
    tokenizer = LlamaTokenizer(tiny_hf_dir / "tokenizer.model")
    text = "é capital of France"
    ids, spans = tokenizer.encode_with_offsets(text)
    assert ids == tokenizer.encode(text)
    assert spans[-1][1] == len(text.encode("utf-8"))


def test_decode_inverts_encode(tiny_hf_dir):
    tokenizer = LlamaTokenizer(tiny_hf_dir / "tokenizer.model")
    assert tokenizer.decode(tokenizer.encode("The capital of Peru is Lima.")) == "The capital of Peru is Lima."


def test_missing_tokenizer_names_the_file(tmp_path):
    with pytest.raises(TokenizerError, match="nothing.model: tokenizer file not found"):
        LlamaTokenizer(tmp_path / "nothing.model")


def test_corrupt_tokenizer_names_the_file(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="bad.model: not a readable SentencePiece model"):
        LlamaTokenizer(bad)
