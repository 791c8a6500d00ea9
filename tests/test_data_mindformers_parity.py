"""On the shared data with the Llama 2 tokenizer: input_ids equal MindFormers' construction, labels
equal its masks wherever it does not blank a sample, none of ours is blank, and the learned tokens
decode to exactly the replies. WikiText chunks follow MindFormers' recipe."""
import json

import numpy as np
import pytest

from conftest import shared_file
from data_helpers import IGNORE, mindformers_qa
from mindsft.data.alpaca import convert_alpaca
from mindsft.data.mindrecord import read_mindrecord
from mindsft.data.preprocess import PreprocessOptions, clean_wikitext, preprocess
from mindsft.tokenizer import LlamaTokenizer

SEQ_LENGTH = 2048

pytest.importorskip("fastchat.conversation")


def ours(tmp_path, source, **kwargs):
    options = PreprocessOptions(input_glob=str(source), model_file=str(shared_file("tokenizers/llama2/tokenizer.model")),
                                output_file=str(tmp_path / "out" / "d.mindrecord"), seq_length=SEQ_LENGTH,
                                progress=False, **kwargs)
    stats = preprocess(options)
    return stats, read_mindrecord(options.output_file)


@pytest.fixture(scope="module", params=["alpaca", "sharegpt"])
def conversations_file(request, tmp_path_factory):
    if request.param == "alpaca":
        path = tmp_path_factory.mktemp("alpaca") / "conv.json"
        convert_alpaca(shared_file("alpaca/alpaca_en_demo.json"), path)
        return path
    return shared_file("sharegpt/dummy_conversation.json")


def test_ids_and_masks_equal_mindformers_and_none_blank(conversations_file, tmp_path):
    model_file = shared_file("tokenizers/llama2/tokenizer.model")
    sources = [c["conversations"] for c in json.load(open(conversations_file, encoding="utf-8"))]
    mf_ids, mf_labels = mindformers_qa(sources, model_file, SEQ_LENGTH + 1)
    stats, records = ours(tmp_path, conversations_file)
    assert stats["dropped"] == stats["skipped"] == 0 and len(records) == len(sources)
    ids = np.stack([r["input_ids"] for r in records])
    labels = np.stack([r["labels"] for r in records])
    assert (ids == mf_ids).all()
    mf_blank = (mf_labels == IGNORE).all(axis=1)
    assert ((labels != IGNORE).any(axis=1)).all(), "a sample of ours is blank"
    assert (labels[~mf_blank] == mf_labels[~mf_blank]).all()
    print(f"{conversations_file.name}: MindFormers blanks {int(mf_blank.sum())} of {len(sources)} samples")


def test_learned_tokens_decode_to_exactly_the_replies(conversations_file, tmp_path):
    tokenizer = LlamaTokenizer(shared_file("tokenizers/llama2/tokenizer.model"))
    conversations = json.load(open(conversations_file, encoding="utf-8"))
    stats, records = ours(tmp_path, conversations_file, num_workers=2)
    truncated = {entry["record"] for entry in stats["truncated_records"]}
    checked = 0
    for index, (conv, record) in enumerate(zip(conversations, records)):
        if index in truncated:
            continue
        learned = record["labels"][record["labels"] != IGNORE].tolist()
        replies, current = [], []
        for token in learned:
            if token == tokenizer.eos_id:
                replies.append(tokenizer.decode(current))
                current = []
            else:
                current.append(token)
        assert not current
        assert replies == [turn["value"] for turn in conv["conversations"] if turn["from"] == "gpt"], index
        checked += 1
    assert checked >= len(conversations) * 0.8


def test_wiki_valid_chunks_follow_mindformers_recipe(tmp_path):
    source = shared_file("wikitext-2/wiki.valid.tokens")
    stats, records = ours(tmp_path, source, dataset_type="wiki", num_workers=2)
    tokenizer = LlamaTokenizer(shared_file("tokenizers/llama2/tokenizer.model"))
    content = []
    with open(source, encoding="utf-8") as f:
        for para in clean_wikitext(f.read()).split("\n\n"):
            if para and not para.strip().startswith("="):
                content += tokenizer.encode(para, add_bos=True, add_eos=True)
    length = SEQ_LENGTH + 1
    assert len(records) == len(content) // length == stats["records_written"] > 0
    assert stats["remainder_tokens_dropped"] == len(content) % length
    for i, record in enumerate(records):
        assert record["input_ids"].tolist() == content[i * length:(i + 1) * length]


def test_wiki_cleaning_undoes_the_markup():
    text = " = Head = \n \n The 1 @,@ 000 @-@ strong army ( of Rome ) won . \n \n"
    cleaned = clean_wikitext(text)
    assert "1,000-strong army (of Rome) won." in cleaned and "\n\n" in cleaned


def test_sample_mindformers_blanks_is_learned_exactly_by_us(tmp_path):
    tokenizer = LlamaTokenizer(shared_file("tokenizers/llama2/tokenizer.model"))
    conversation = [{"from": "human", "value": "What does 'USER: hi ASSISTANT: hello' mean?"},
                    {"from": "gpt", "value": "It is a chat transcript."}]
    source = tmp_path / "quoted.json"
    source.write_text(json.dumps([{"conversations": conversation}]))
    mf_ids, mf_labels = mindformers_qa([conversation], shared_file("tokenizers/llama2/tokenizer.model"), SEQ_LENGTH + 1)
    assert (mf_labels == IGNORE).all()  # MindFormers silently drops this sample from training
    _, (record,) = ours(tmp_path, source)
    assert (record["input_ids"] == mf_ids[0]).all()
    learned = record["labels"][record["labels"] != IGNORE].tolist()
    assert learned[-1] == tokenizer.eos_id and tokenizer.decode(learned[:-1]) == "It is a chat transcript."
