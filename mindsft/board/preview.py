"""What the Prepare tab shows before anything runs: a model's family, shape and tokenizer from its
config, and data files' record counts with the first sample rendered in the template, each
token marked learned or not exactly as llama_preprocess will label it (the same readers,
template and encoder)."""
import os

from mindsft.board.forms import model_family, path_of
from mindsft.data.conversations import normalize_record, read_json_records
from mindsft.errors import DataError
from mindsft.templates import encode_segments, get_template
from mindsft.tokenizer import load_tokenizer

PREVIEW_TOKENS = 512


def model_summary(model_path):
    """Family, shape and tokenizer of an HF folder or a checkpoint (from the config beside it)."""
    model_path = path_of(model_path)
    if not model_path or not os.path.exists(model_path):
        raise DataError(f"{model_path or 'model'}: no such file or folder (an HF model folder or a .ckpt)")
    family, config, config_path = model_family(model_path)
    if family is None:
        raise DataError(f"{model_path}: no config.json in it and no X.config.json beside it (convert_weight.py "
                        "writes one beside the .ckpt); the model's family and shape are unknown")
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
    tokenizer = next((os.path.join(folder, name) for name in ("tokenizer.model", "tokenizer.json")
                      if os.path.isfile(os.path.join(folder, name))), None)
    return {"family": family.name, "config": config_path, "kind": "hf" if os.path.isdir(model_path) else "ckpt",
            "arch": family.arch_types[0], "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "num_layers": config.num_layers, "num_heads": config.num_heads, "n_kv_heads": config.n_kv_heads,
            "intermediate_size": config.intermediate_size, "tokenizer": tokenizer}


def token_pieces(tokenizer, ids):
    """Each token's text, as the growing decode shows it (sentencepiece's word-initial spaces
    appear only in context)."""
    pieces, shown = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end])
        if text.endswith("\ufffd"):
            pieces.append("")
            continue
        pieces.append(text[len(shown):] if text.startswith(shown) else text)
        shown = text
    return pieces


def data_summary(data_paths, tokenizer_path, template_name, seq_length=None):
    """Record counts of each file and the first sample's tokens with their learned flags."""
    files = []
    first = None
    for path in (path_of(p) for p in data_paths if str(p).strip()):
        records = read_json_records(path)
        files.append({"path": path, "records": len(records)})
        if first is None and records:
            try:
                first = normalize_record(records[0])
            except DataError as err:
                raise DataError(f"{path}: record 0: {err}") from None
    if not files:
        raise DataError("data: give one or more .json/.jsonl files (alpaca, ShareGPT or OpenAI messages)")
    tokenizer = load_tokenizer(path_of(tokenizer_path))
    template = get_template(template_name or "vicuna_v1.1", None, tokenizer)
    ids, learned = encode_segments(tokenizer, template.segments(first))
    limit = int(seq_length) + 1 if seq_length else PREVIEW_TOKENS
    tokens = [{"text": text, "learned": bool(keep), "id": int(token)}
              for text, keep, token in zip(token_pieces(tokenizer, ids[:limit]), learned[:limit], ids[:limit])]
    return {"files": files, "template": template.name, "sample_tokens": len(ids),
            "learned_tokens": int(sum(bool(k) for k in learned[:limit])), "truncated": len(ids) > limit,
            "tokens": tokens}
