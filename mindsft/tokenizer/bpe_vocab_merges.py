"""A byte-level BPE given as GPT-2's `vocab.json` + `merges.txt` pair (Qwen2/2.5, as MindFormers'
`research/qwen2/qwen2_tokenizer.py` reads it), built in memory as a `tokenizers` model so it
encodes exactly as the `tokenizer.json` of the same model does.

Also the one builder of byte-level BPE backends, which the tiktoken reader uses too.
"""
import json
import os

from mindsft.errors import TokenizerError
from mindsft.tokenizer.tokenizer_json import JsonTokenizer

# Qwen2's pre-tokenizer split (its tokenizer.json's and qwen2_tokenizer.py's): digits one by one.
QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# The special tokens qwen2_tokenizer.py adds after the vocabulary, in this order (151643-151645).
QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# What Qwen2's tokenizer renders a conversation with when its config names no chat template:
# MindFormers' (and transformers' former) default ChatML, no system turn added, no EOS.
CHATML_TEMPLATE = ("{% for message in messages %}"
                   "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                   "{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_to_char():
    """GPT-2's `bytes_to_unicode`: the character a byte-level vocabulary spells each byte with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def byte_level_backend(vocab, merges, split_pattern, special_tokens, ignore_merges=False, normalize_nfc=False,
                       trim_offsets=False, bos_token=None):
    """A `tokenizers.Tokenizer`: split by `split_pattern`, then byte-level BPE of `vocab`
    ({token: id}) and `merges` ([(left, right)], first = highest priority); `special_tokens` added
    after the vocabulary in order; `bos_token` put before a text when special tokens are asked."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    backend = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    if normalize_nfc:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=trim_offsets, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in special_tokens])
    if bos_token is not None:
        bos_id = backend.token_to_id(bos_token)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)])
    return backend


def read_vocab_merges(vocab_file, merges_file):
    """({token: id}, [(left, right)]) of a vocab.json and merges.txt, or an error naming the file."""
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise TokenizerError(f"{vocab_file}: not a readable vocab.json ({err})") from None
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise TokenizerError(f"{vocab_file}: a vocab.json maps each token to its integer id")
    merges = []
    try:
        with open(merges_file, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip() or (number == 1 and line.startswith("#version")):
                    continue
                pair = line.split(" ")
                if len(pair) != 2:
                    raise TokenizerError(f"{merges_file}: line {number} is not two tokens separated by a space")
                merges.append(tuple(pair))
    except (OSError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{merges_file}: not a readable merges.txt ({err})") from None
    return vocab, merges


class VocabMergesTokenizer(JsonTokenizer):
    """Qwen2's `vocab.json` + `merges.txt`, with `<|endoftext|>` (eos and pad), `<|im_start|>` and
    `<|im_end|>` after the vocabulary as MindFormers' Qwen2Tokenizer adds them; no BOS; `<|im_end|>`
    also ends a reply."""

    def __init__(self, vocab_file, merges_file):
        vocab_file, merges_file = os.fspath(vocab_file), os.fspath(merges_file)
        for path in (vocab_file, merges_file):
            if not os.path.isfile(path):
                raise TokenizerError(f"{path}: tokenizer file not found")
        vocab, merges = read_vocab_merges(vocab_file, merges_file)
        try:
            self.backend = byte_level_backend(vocab, merges, QWEN2_SPLIT_PATTERN, QWEN2_SPECIAL_TOKENS,
                                              normalize_nfc=True)
        except Exception as err:  # the library raises plain Exceptions (a merge of unknown tokens)
            raise TokenizerError(f"{vocab_file} + {merges_file}: not a byte-level BPE ({err})") from None
        self.merges_file = merges_file
        self.config_path = None
        config = {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None}
        self._set_up(vocab_file, config, CHATML_TEMPLATE, os.path.dirname(os.path.abspath(vocab_file)))
        self.end_ids = tuple(dict.fromkeys(self.end_ids + (self.backend.token_to_id("<|im_end|>"),)))

    def sha256(self):
        import hashlib
        digest = hashlib.sha256()
        for path in (self.path, self.merges_file):
            with open(path, "rb") as f:
                digest.update(f.read())
        return digest.hexdigest()
