"""A HuggingFace tokenizer.json encodes as transformers' AutoTokenizer does, with exact byte spans,
the special tokens of its tokenizer_config.json and every end token of generation_config.json."""
import json
import re
import shutil

import numpy as np
import pytest

from conftest import shared_file
from mindsft.errors import TokenizerError
from mindsft.tokenizer import JsonTokenizer, SentencePieceTokenizer, load_tokenizer
from tokenizer_helpers import EXTRA_TEXTS, load_conversations, training_texts, write_bpe_tokenizer

transformers = pytest.importorskip("transformers")


def reference(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def shared_texts():
    """Every alpaca field and ShareGPT turn of ../shared/data."""
    with open(shared_file("alpaca/alpaca_en_demo.json"), encoding="utf-8") as f:
        alpaca = json.load(f)
    texts = [r[key] for r in alpaca for key in ("instruction", "input", "output") if r[key]]
    texts += [m["content"] for c in load_conversations(shared_file("sharegpt/dummy_conversation.json")) for m in c]
    return texts + EXTRA_TEXTS


def assert_same_ids_as_transformers(ours, ref, texts):
    for text in texts:
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
        # AutoTokenizer's default adds what the post-processor adds: Llama 3's BOS, nothing for Qwen
        assert ours.encode(text, add_bos=ours.adds_bos) == ref(text)["input_ids"], text


def char_boundaries(text):
    return np.cumsum([0] + [len(c.encode("utf-8")) for c in text])


def assert_spans_tile_and_match_offsets(ours, texts):
    """Spans from token byte lengths (the fast path) tile the UTF-8 text and equal the library's
    offsets turned into bytes, which count whole characters: a token holding the first bytes of a
    character the next token ends is given that whole character there."""
    fast_path_taken = 0
    for text in texts:
        ids, begins, ends = ours.encode_spans(text)
        assert ids.tolist() == ours.encode(text)
        if not len(ids):
            continue
        assert begins[0] == 0 and ends[-1] == len(text.encode("utf-8"))
        assert (begins[1:] == ends[:-1]).all() and (ends >= begins).all()
        slow_begins, slow_ends = ours._offset_spans(text, ours.backend.encode(text, add_special_tokens=False))
        boundaries = char_boundaries(text)
        rounded_up = boundaries[np.searchsorted(boundaries, ends)]
        assert slow_ends.tolist() == rounded_up.tolist(), text
        fast_path_taken += ours._token_bytes is not None
    return fast_path_taken


def test_ids_equal_autotokenizer_on_a_byte_level_bpe(bpe_dir):
    ours = load_tokenizer(bpe_dir)
    assert isinstance(ours, JsonTokenizer)
    assert_same_ids_as_transformers(ours, reference(bpe_dir), training_texts())


def test_special_tokens_come_from_tokenizer_config_and_end_ids_from_generation_config(bpe_dir):
    ours, ref = load_tokenizer(bpe_dir), reference(bpe_dir)
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    assert ours.end_ids == (ref.eos_token_id, 1)  # eos first, then the rest of generation_config's list
    assert ours.pad_id == ours.eos_id and ours.unk_id is None  # no pad or unk token: pad with eos
    assert ours.chat_template == ref.chat_template
    assert ours.config_path == str(bpe_dir / "tokenizer_config.json")


def test_pad_token_of_the_config_is_the_pad_id(tmp_path):
    folder = write_bpe_tokenizer(tmp_path / "bpe", pad="<|endoftext|>")
    ours = load_tokenizer(folder)
    assert ours.pad_id == ours.token_to_id("<|endoftext|>") == reference(folder).pad_token_id


def test_special_tokens_written_in_text_are_those_tokens(bpe_dir):
    ours, ref = load_tokenizer(bpe_dir), reference(bpe_dir)
    text = "<|start_header_id|>user<|end_header_id|>\n\nhé<|eot_id|>"
    assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text)[0] == ours.token_to_id("<|start_header_id|>")
    assert ours.decode(ours.encode(text)) == text


def test_byte_spans_tile_the_text_and_equal_the_library_offsets(bpe_dir):
    ours = load_tokenizer(bpe_dir)
    assert assert_spans_tile_and_match_offsets(ours, training_texts() + ["<|eot_id|>é<|im_end|>"])


def test_a_normalizing_tokenizer_takes_its_spans_from_offsets(tmp_path):
    folder = write_bpe_tokenizer(tmp_path / "nfc", nfc=True)
    ours, ref = load_tokenizer(folder), reference(folder)
    decomposed = "cafe\u0301 and e\u0301te\u0301"  # NFC composes these: the text does not reach the model as is
    ids, begins, ends = ours.encode_spans(decomposed)
    assert not ours._text_unchanged(decomposed)
    assert ids.tolist() == ref(decomposed, add_special_tokens=False)["input_ids"]
    assert ends[-1] == len(decomposed.encode("utf-8")) and (begins[1:] == ends[:-1]).all()


@pytest.mark.parametrize("nfc", [False, True])
def test_a_chunk_encoded_as_one_stream_gives_each_texts_spans_from_its_start(tmp_path, nfc):
    """encode_spans_flat (preprocessing's chunks) equals encode_spans text by text, shifted by where
    each text starts; a normalizing tokenizer takes the per-text path."""
    ours = load_tokenizer(write_bpe_tokenizer(tmp_path / "bpe", nfc=nfc))
    texts = training_texts()[:5] + ["", "<|eot_id|>é<|im_end|>", "cafe\u0301 x"]
    ids, begins, ends, lengths, starts = ours.encode_spans_flat(texts)
    assert lengths.tolist() == [len(ours.encode(t)) for t in texts]
    assert starts.tolist() == np.cumsum([0] + [len(t.encode("utf-8")) for t in texts[:-1]]).tolist()
    at = np.concatenate(([0], np.cumsum(lengths)))
    for k, text in enumerate(texts):
        text_ids, text_begins, text_ends = ours.encode_spans(text)
        assert ids[at[k]:at[k + 1]].tolist() == text_ids.tolist()
        assert (begins[at[k]:at[k + 1]] - starts[k]).tolist() == text_begins.tolist()
        assert (ends[at[k]:at[k + 1]] - starts[k]).tolist() == text_ends.tolist()


def test_decode_inverts_encode(bpe_dir):
    ours = load_tokenizer(bpe_dir)
    for text in EXTRA_TEXTS:
        assert ours.decode(ours.encode(text)) == text


def test_load_tokenizer_takes_a_file_or_a_folder(bpe_dir, tmp_path, tiny_hf_dir):
    assert load_tokenizer(bpe_dir / "tokenizer.json").path == str(bpe_dir / "tokenizer.json")
    assert load_tokenizer(bpe_dir).path == str(bpe_dir / "tokenizer.json")
    assert isinstance(load_tokenizer(tiny_hf_dir / "tokenizer.model"), SentencePieceTokenizer)
    # a folder with both (Llama 2, Mistral): the SentencePiece original, not its conversion
    both = tmp_path / "both"
    shutil.copytree(bpe_dir, both)
    shutil.copy(tiny_hf_dir / "tokenizer.model", both / "tokenizer.model")
    assert isinstance(load_tokenizer(both), SentencePieceTokenizer)


def test_bare_tokenizer_json_takes_bos_from_its_post_processor(bpe_dir, tmp_path):
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    assert ours.bos_id == ours.token_to_id("<|begin_of_text|>") and ours.eos_id is None and ours.end_ids == ()


@pytest.mark.parametrize("case", ["missing", "config", "empty_folder", "corrupt"])
def test_what_is_not_a_tokenizer_is_named(bpe_dir, tmp_path, case):
    path, message = {
        "missing": (tmp_path / "nope.json", "nope.json: tokenizer file not found"),
        "config": (bpe_dir / "tokenizer_config.json", "tokenizer_config.json: a tokenizer config, not a tokenizer"),
        "empty_folder": (tmp_path, "holds neither tokenizer.model nor tokenizer.json"),
        "corrupt": (tmp_path / "tokenizer.json", "tokenizer.json: not a readable tokenizer.json"),
    }[case]
    if case == "corrupt":
        path.write_text("{not json")
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(path)


@pytest.mark.parametrize("name", ["llama3_1", "qwen3"])
def test_real_tokenizers_give_autotokenizer_ids_on_the_shared_texts(name):
    folder = shared_file(f"tokenizers/{name}")
    ours = load_tokenizer(folder)
    assert_same_ids_as_transformers(ours, reference(folder), shared_texts())


@pytest.mark.parametrize("name", ["llama3_1", "qwen3"])
def test_real_tokenizers_spans_from_token_lengths_equal_the_offsets(name):
    """The known trap: offsets of Llama 3's merges. Spans from byte lengths are checked against
    the library's offsets on every shared text (and against apply_chat_template in the template tests)."""
    ours = load_tokenizer(shared_file(f"tokenizers/{name}"))
    texts = shared_texts()
    assert assert_spans_tile_and_match_offsets(ours, texts) == sum(bool(ours.encode(t)) for t in texts)


def test_real_special_ids():
    llama3, qwen3 = (load_tokenizer(shared_file(f"tokenizers/{n}")) for n in ("llama3_1", "qwen3"))
    assert llama3.encode("Hello world!", add_bos=llama3.adds_bos) == [128000, 9906, 1917, 0]
    assert (llama3.bos_id, llama3.eos_id, llama3.end_ids) == (128000, 128009, (128009,))
    assert qwen3.encode("Hello world!", add_bos=qwen3.adds_bos) == [9707, 1879, 0]
    assert (qwen3.bos_id, qwen3.eos_id, qwen3.pad_id) == (None, 151645, 151643)
    assert np.asarray(qwen3.encode("<|im_start|>")).tolist() == [151644]


# --- llama_preprocess with a tokenizer.json: real MindRecord shards ---

def test_preprocess_with_a_tokenizer_json_writes_apply_chat_template_ids_and_reply_labels(bpe_dir, tmp_path):
    """Two workers, the `hf` template from the folder's own tokenizer_config.json: each record
    holds apply_chat_template's ids, padded with the pad id, and learns each reply and <|eot_id|>."""
    from mindsft.data.mindrecord import read_mindrecord
    from mindsft.data.preprocess import PreprocessOptions, preprocess
    from mindsft.demo_model import SAMPLE_ALPACA
    from tokenizer_helpers import learned_runs
    conversations = load_conversations(SAMPLE_ALPACA)
    output = tmp_path / "out" / "data.mindrecord"
    stats = preprocess(PreprocessOptions(
        input_glob=str(SAMPLE_ALPACA), model_file=str(bpe_dir), output_file=str(output), seq_length=512,
        template="hf", num_workers=2, progress=False, command_line=["test"]))
    ours, ref = load_tokenizer(bpe_dir), reference(bpe_dir)
    records = read_mindrecord(output)
    assert len(records) == len(conversations) == stats["records_written"] and stats["truncated"] == 0
    assert stats["tokenizer"] == str(bpe_dir / "tokenizer.json")
    assert stats["tokenizer_config"] == str(bpe_dir / "tokenizer_config.json")
    for record, messages in zip(records, conversations):
        expected = list(ref.apply_chat_template(messages, tokenize=True)["input_ids"])
        ids, labels = record["input_ids"].tolist(), record["labels"].tolist()
        assert ids[:len(expected)] == expected and set(ids[len(expected):]) <= {ours.pad_id}
        learned = [label != -100 for label in labels]
        assert [ours.decode(run) for run in learned_runs(ids, learned)] == [messages[1]["content"].strip() + "<|eot_id|>"]


def test_preprocess_cli_takes_an_hf_folder_and_the_llama3_template(bpe_dir, tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    from mindsft.demo_model import SAMPLE_ALPACA
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "llama_preprocess.py"), "--input_glob", str(SAMPLE_ALPACA),
                          "--model_file", str(bpe_dir), "--output_file", str(tmp_path / "d.mindrecord"),
                          "--seq_length", "256", "--template", "llama3", "--no_progress"],
                         capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "GLOG_v": "3",
                                                                       "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "Wrote" in out.stdout


def test_preprocess_refuses_a_template_the_tokenizer_cannot_spell(tiny_hf_dir, tmp_path):
    from mindsft.data.preprocess import PreprocessOptions, preprocess
    from mindsft.errors import ConfigError
    from mindsft.demo_model import SAMPLE_ALPACA
    with pytest.raises(ConfigError, match=re.escape("'<|begin_of_text|>' is not a token")):
        preprocess(PreprocessOptions(input_glob=str(SAMPLE_ALPACA), model_file=str(tiny_hf_dir / "tokenizer.model"),
                                     output_file=str(tmp_path / "d.mindrecord"), template="llama3", progress=False))
    assert not list(tmp_path.iterdir())


def test_predict_stops_at_every_end_token_and_the_templates_turn_end(bpe_dir, tmp_path):
    from mindsft.predict import generation_settings
    from mindsft.templates import get_template
    ours = load_tokenizer(bpe_dir)
    settings = generation_settings({"max_new_tokens": 4}, ours, get_template("llama3"))
    assert settings.stop_ids() == {ours.eos_id, 1}  # <|eot_id|> and generation_config's <|end_of_text|>
    assert settings.pad_token_id == ours.pad_id
    # a base model's tokenizer whose eos is <|end_of_text|>: the llama3 template still stops at <|eot_id|>
    base = write_bpe_tokenizer(tmp_path / "base", eos="<|end_of_text|>")
    base_tokenizer = load_tokenizer(base)
    settings = generation_settings({}, base_tokenizer, get_template("llama3"))
    assert settings.stop_ids() == {base_tokenizer.token_to_id("<|end_of_text|>"), base_tokenizer.token_to_id("<|eot_id|>")}
    # settings given in the run config win
    assert generation_settings({"eos_token_id": 5}, ours, get_template("raw")).stop_ids() == {5}


def test_with_two_workers_a_template_the_tokenizer_cannot_spell_is_one_line_no_traceback(tiny_hf_dir, tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    from mindsft.demo_model import SAMPLE_ALPACA
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "llama_preprocess.py"), "--input_glob", str(SAMPLE_ALPACA),
                          "--model_file", str(tiny_hf_dir / "tokenizer.model"), "--output_file",
                          str(tmp_path / "d.mindrecord"), "--template", "llama3", "--num_workers", "2", "--no_progress"],
                         capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "GLOG_v": "3",
                                                                       "PATH": "/usr/bin:/bin"})
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"error: {tiny_hf_dir / 'tokenizer.model'}: '<|begin_of_text|>' is not a token of this tokenizer; "
        "the template needs the tokenizer of its model family"]


def test_wiki_with_a_tokenizer_json_wraps_each_paragraph_in_its_bos_and_eos(bpe_dir, tmp_path):
    from mindsft.data.mindrecord import read_mindrecord
    from mindsft.data.preprocess import PreprocessOptions, preprocess
    paragraphs = ["The cat sat on the mat.", "It cost 1,000 and 2.5 — é 😀."] * 10
    source = tmp_path / "wiki.tokens"
    source.write_text("\n\n".join(paragraphs) + "\n")
    preprocess(PreprocessOptions(input_glob=str(source), model_file=str(bpe_dir), output_file=str(tmp_path / "w.mindrecord"),
                                 dataset_type="wiki", seq_length=15, num_workers=2, progress=False, command_line=["test"]))
    ours, ref = load_tokenizer(bpe_dir), reference(bpe_dir)
    expected = [i for p in paragraphs for i in ref(p)["input_ids"] + [ref.eos_token_id]]
    records = read_mindrecord(tmp_path / "w.mindrecord")
    assert expected[0] == ours.bos_id and len(records) == len(expected) // 16
    assert np.concatenate([r["input_ids"] for r in records]).tolist() == expected[:len(records) * 16]
