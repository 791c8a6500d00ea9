"""Meta's original Llama 3 / 3.1 `tokenizer.model`: a tiktoken file (one `base64(token bytes) rank`
per line), read as MindFormers' `research/llama3_1/llama3_1_tokenizer.py` reads it (the Llama 3
split pattern, 256 special tokens from the end of the vocabulary) and built in memory as a
`tokenizers` byte-level BPE, so it encodes as the model's `tokenizer.json` does.

tiktoken merges, within a pre-token, the adjacent pair whose joined bytes have the lowest rank, and
takes a pre-token that is itself a token whole. A BPE whose merges are every split of each token
into two tokens, ranked by the joined token's rank, with merges ignored for a whole-token
pre-token, does the same.
"""
import base64
import binascii
import os
import re

from mindsft.errors import TokenizerError
from mindsft.tokenizer.bpe_vocab_merges import byte_level_backend, byte_to_char
from mindsft.tokenizer.tokenizer_json import JsonTokenizer

LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                        r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL_TOKENS = 256
# The special tokens after the vocabulary, named as llama3_1_tokenizer.py names them (Llama 3's
# list; Llama 3.1's tokenizer.json renames a few reserved ones, the ids are the same).
LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                         "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
                         "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|reserved_special_token_4|>", "<|eot_id|>") + tuple(
    f"<|reserved_special_token_{i}|>" for i in range(5, NUM_SPECIAL_TOKENS - 5))
# llama3_1_tokenizer.py's defaults (the research YAML's pad_token_id 128002 is the third).
LLAMA3_TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                 "pad_token": "<|reserved_special_token_0|>", "unk_token": None}
_LINE = re.compile(rb"^[A-Za-z0-9+/]+=*[ \t]+\d+\r?$")


def is_tiktoken_file(path):
    """Whether a file reads as a tiktoken model (its first line `base64 rank`); a SentencePiece
    model is a binary protobuf and never does."""
    try:
        with open(path, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return False
    return bool(_LINE.match(first.rstrip(b"\n")))


def read_tiktoken_ranks(path):
    """The tokens' bytes in rank order (ranks must be 0, 1, ... without gaps), or an error naming the line."""
    by_rank = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error):
                raise TokenizerError(f"{path}: line {number} is not 'base64-token rank' (a tiktoken "
                                     "tokenizer.model)") from None
            if rank in by_rank:
                raise TokenizerError(f"{path}: line {number}: rank {rank} appears twice")
            by_rank[rank] = token
    if not by_rank or sorted(by_rank) != list(range(len(by_rank))):
        raise TokenizerError(f"{path}: the ranks are not 0..{len(by_rank) - 1} without gaps")
    return [by_rank[rank] for rank in range(len(by_rank))]


def vocab_and_merges(tokens):
    """({byte-level text: id}, merges) of tiktoken tokens given in rank order (see the module doc)."""
    chars = byte_to_char()
    spell = [None] * len(tokens)
    ranks = {}
    for rank, token in enumerate(tokens):
        spell[rank] = "".join(chars[b] for b in token)
        ranks[token] = rank
    merges = []
    for rank, token in enumerate(tokens):
        splits = [(ranks[token[:i]], ranks[token[i:]]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        # Equal-rank splits of one token: the one of lower-ranked parts first (ties never meet in
        # a real vocabulary's encodings, but the order is fixed).
        merges.extend((spell[left], spell[right]) for left, right in sorted(splits))
    return {text: rank for rank, text in enumerate(spell)}, merges


class TiktokenTokenizer(JsonTokenizer):
    """A Llama 3 / 3.1 tiktoken `tokenizer.model`, ids equal to its `tokenizer.json`'s; BOS
    `<|begin_of_text|>`, EOS `<|end_of_text|>`, pad `<|reserved_special_token_0|>` (MindFormers'
    defaults); `<|eot_id|>` also ends a reply."""

    def __init__(self, model_file):
        path = os.fspath(model_file)
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: tokenizer file not found")
        vocab, merges = vocab_and_merges(read_tiktoken_ranks(path))
        self.backend = byte_level_backend(vocab, merges, LLAMA3_SPLIT_PATTERN, LLAMA3_SPECIAL_TOKENS,
                                          ignore_merges=True, trim_offsets=True,
                                          bos_token=LLAMA3_TOKENS["bos_token"])
        self.config_path = None
        self._set_up(path, dict(LLAMA3_TOKENS), None, os.path.dirname(os.path.abspath(path)))
        self.end_ids = tuple(dict.fromkeys(self.end_ids + (self.backend.token_to_id("<|eot_id|>"),)))
