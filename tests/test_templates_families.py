"""The family templates (llama3, qwen, mistral, baichuan2) and `hf` give the ids transformers'
apply_chat_template gives, and learn exactly each reply and the token that ends it."""
import json
import re

import pytest

from conftest import shared_file
from mindsft.data.preprocess import encode_conversation
from mindsft.errors import ConfigError
from mindsft.data.encode import encode_segment_batch
from mindsft.templates import check_template_tokens, encode_segments, get_template
from mindsft.tokenizer import load_tokenizer
from tokenizer_helpers import (LLAMA3_JINJA, MISTRAL_V03_JINJA, QWEN25_JINJA, learned_runs, load_conversations,
                               write_bpe_tokenizer)

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": " Paris. "}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Give three tips for staying healthy."},
     {"role": "assistant", "content": "Eat well, sleep, move."},
     {"role": "user", "content": "héllo 😀 again?\n"},
     {"role": "assistant", "content": "\nYes: 日本語 and 1 2 3."}],
]


def reference_ids(ref, messages, **kwargs):
    # transformers 5 returns a BatchEncoding (return_dict=True by default)
    return list(ref.apply_chat_template(messages, tokenize=True, **kwargs)["input_ids"])


def assert_matches_apply_chat_template(ours, ref, template, conversations, expected_replies):
    """Whole conversations through mindsft's preprocessing code give apply_chat_template's ids;
    the learned tokens decode to each reply and its end token; the prompt at every user turn
    gives apply_chat_template's generation prompt and opens the training ids. Encoded one by one
    and as a batch (as preprocessing workers encode a chunk), with the same result."""
    batch = encode_segment_batch(ours, [template.segments(messages) for messages in conversations])
    for messages, (batch_ids, batch_learned) in zip(conversations, batch):
        ids, learned = encode_conversation(ours, template, messages)
        assert ids.tolist() == batch_ids.tolist() and learned.tolist() == batch_learned.tolist()
        ids, learned = ids.tolist(), learned.tolist()
        assert ids == reference_ids(ref, messages), messages
        assert [ours.decode(run) for run in learned_runs(ids, learned)] == expected_replies(messages)
        for end in range(1, len(messages), 2):
            if messages[end - 1]["role"] != "user":
                continue
            prompt = template.encode_prompt(ours, messages[:end])
            if not (messages[0]["role"] == "system" and template.name == "mistral"):
                assert prompt == reference_ids(ref, messages[:end], add_generation_prompt=True)
            assert ids[:len(prompt)] == prompt and not learned[len(prompt) - 1] and learned[len(prompt)]


def replies(strip=False, end="", prefix="", last_prefix=""):
    def expected(messages):
        texts = [m["content"].strip() if strip else m["content"] for m in messages if m["role"] == "assistant"]
        out = [prefix + t + end for t in texts]
        if last_prefix:
            out[-1] = last_prefix + texts[-1].lstrip("\n") + end
        return out
    return expected


# --- always run: a BPE built in the test, each family's chat template rendered by transformers ---

@pytest.mark.parametrize("name", ["llama3", "hf"])
def test_llama3_equals_apply_chat_template(bpe_dir, name):
    ours, ref = load_tokenizer(bpe_dir), transformers.AutoTokenizer.from_pretrained(str(bpe_dir))
    assert ref.chat_template == LLAMA3_JINJA
    assert_matches_apply_chat_template(ours, ref, get_template(name, tokenizer=ours), CONVERSATIONS,
                                       replies(strip=True, end="<|eot_id|>"))


def test_qwen_equals_qwen25s_template_with_its_default_system(tmp_path):
    folder = write_bpe_tokenizer(tmp_path / "qwen", QWEN25_JINJA, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    ours, ref = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    template = get_template("qwen")
    assert_matches_apply_chat_template(ours, ref, template, CONVERSATIONS, replies(end="<|im_end|>"))
    assert template.render(CONVERSATIONS[0]).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")


def test_hf_template_that_writes_no_bos_gives_no_bos_with_a_tokenizer_json(tmp_path):
    folder = write_bpe_tokenizer(tmp_path / "nobos", QWEN25_JINJA, bos="<|begin_of_text|>", eos="<|im_end|>")
    ours, ref = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    assert_matches_apply_chat_template(ours, ref, get_template("hf", tokenizer=ours), CONVERSATIONS,
                                       replies(end="<|im_end|>"))
    assert encode_segments(ours, get_template("hf", tokenizer=ours).segments(CONVERSATIONS[0]))[0][0] != ours.bos_id


def test_mistral_equals_mistral_v03s_template(tmp_path):
    folder = write_bpe_tokenizer(tmp_path / "mistral", MISTRAL_V03_JINJA, bos="<s>", eos="</s>")
    ours, ref = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    template = get_template("mistral")
    no_system = [c[1:] if c[0]["role"] == "system" else c for c in CONVERSATIONS]
    assert_matches_apply_chat_template(ours, ref, template, no_system, replies(strip=True, end="</s>", prefix=" "))
    # With a system message Mistral's template shows it only before the last user turn (never in a
    # trained conversation); here it opens the first, and a one-question prompt is Mistral's.
    system_prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert template.encode_prompt(ours, system_prompt) == reference_ids(ref, system_prompt)
    assert template.render(CONVERSATIONS[1]).startswith("[INST] Be brief.\n\nGive three tips")


def test_baichuan2_lays_out_rounds_as_baichuan2s_own_code(bpe_dir):
    """Baichuan2's chat format is not a jinja template but code (generation_utils.build_chat_input
    and fine-tune.py): user token 195, the question, assistant token 196, the answer, EOS. Rebuilt
    here from the tokenizer's ids, no BOS."""
    ours = load_tokenizer(bpe_dir)
    user, assistant = ours.token_to_id("<reserved_106>"), ours.token_to_id("<reserved_107>")
    for messages in CONVERSATIONS:
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        turns = messages[1:] if system else messages
        expected, expected_learned = ours.encode(system), []
        expected_learned = [False] * len(expected)
        for turn in turns:
            if turn["role"] == "user":
                piece = [user] + ours.encode(turn["content"]) + [assistant]
                expected_learned += [False] * len(piece)
            else:
                piece = ours.encode(turn["content"]) + [ours.eos_id]
                expected_learned += [True] * len(piece)
            expected += piece
        ids, learned = encode_segments(ours, get_template("baichuan2").segments(messages))
        assert (ids, learned) == (expected, expected_learned)


def test_a_template_whose_tokens_the_tokenizer_lacks_is_refused_naming_the_token(tiny_hf_dir, bpe_dir):
    sentencepiece = load_tokenizer(tiny_hf_dir / "tokenizer.model")
    with pytest.raises(ConfigError, match=re.escape("'<|begin_of_text|>' is not a token")):
        check_template_tokens(get_template("llama3"), sentencepiece)
    check_template_tokens(get_template("llama3"), load_tokenizer(bpe_dir))
    # Mistral's tokenizer.model has [INST] as a piece, but its spaces are laid out for tokenizer.json
    with pytest.raises(ConfigError, match="template 'mistral' needs the model's tokenizer.json"):
        check_template_tokens(get_template("mistral"), sentencepiece)


def test_hf_template_of_a_folder_is_its_tokenizer_config(bpe_dir):
    ours = load_tokenizer(bpe_dir)
    template = get_template("hf", tokenizer=ours)
    assert template.path == str(bpe_dir / "tokenizer_config.json")
    # end tokens: the eos and generation_config's other end ids
    assert template.end_texts == ("<|eot_id|>", "<|end_of_text|>")


# --- the real Llama 3.1 and Qwen3 tokenizers on every shared ShareGPT conversation ---

def sharegpt():
    return load_conversations(shared_file("sharegpt/dummy_conversation.json"))


@pytest.mark.parametrize("name", ["llama3", "hf"])
def test_llama3_1_every_sharegpt_conversation_equals_apply_chat_template(name):
    folder = shared_file("tokenizers/llama3_1")
    ours, ref = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    assert_matches_apply_chat_template(ours, ref, get_template(name, tokenizer=ours), sharegpt(),
                                       replies(strip=True, end="<|eot_id|>"))


def test_qwen3_every_sharegpt_conversation_equals_apply_chat_template():
    """Qwen3's template writes an empty <think> block before the last reply only (history drops
    reasoning): the model learns it there, as it would generate it."""
    folder = shared_file("tokenizers/qwen3")
    ours, ref = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    assert_matches_apply_chat_template(ours, ref, get_template("hf", tokenizer=ours), sharegpt(),
                                       replies(end="<|im_end|>", last_prefix="<think>\n\n</think>\n\n"))


QWEN3_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "<city>"}},
                   "required": ["city"]}}}]
QWEN3_TOOL_CONVERSATION = [
    {"role": "system", "content": "You help with weather."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "<think>\nIt is mild.\n</think>\n\nIt is 21 °C in Paris."},
]


def test_qwen3_tools_tool_calls_and_think_blocks_render_as_transformers():
    folder = shared_file("tokenizers/qwen3")
    ours, ref = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    template = get_template("hf", tokenizer=ours)
    messages = QWEN3_TOOL_CONVERSATION
    assert template.render(messages, tools=QWEN3_TOOLS) == ref.apply_chat_template(
        messages, tools=QWEN3_TOOLS, tokenize=False)
    ids, learned = encode_segments(ours, template.segments(messages, tools=QWEN3_TOOLS))
    assert ids == reference_ids(ref, messages, tools=QWEN3_TOOLS)
    runs = [ours.decode(run) for run in learned_runs(ids, learned)]
    # the tool call is learned (it is the reply), the tool's answer is not; reasoning after the
    # last question is kept and learned
    assert runs[0].startswith("<think>\nI should call the tool.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\"")
    assert runs[0].endswith("</tool_call><|im_end|>")
    assert runs[1] == "<think>\nIt is mild.\n</think>\n\nIt is 21 °C in Paris.<|im_end|>"
    assert all("temp" not in run for run in runs)
    prompt = template.encode_prompt(ours, messages[:2], tools=QWEN3_TOOLS)
    assert prompt == reference_ids(ref, messages[:2], tools=QWEN3_TOOLS, add_generation_prompt=True)


def test_preprocess_reads_openai_records_with_tools_for_the_hf_template(tmp_path):
    """A JSON Lines record with `tools`, an assistant tool call and a tool turn becomes the ids
    transformers gives it, through llama_preprocess."""
    from mindsft.data.mindrecord import read_mindrecord
    from mindsft.data.preprocess import PreprocessOptions, preprocess
    folder = shared_file("tokenizers/qwen3")
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps({"messages": QWEN3_TOOL_CONVERSATION, "tools": QWEN3_TOOLS}) + "\n")
    preprocess(PreprocessOptions(input_glob=str(data), model_file=str(folder), output_file=str(tmp_path / "t.mindrecord"),
                                 seq_length=512, template="hf", progress=False, command_line=["test"]))
    record = read_mindrecord(tmp_path / "t.mindrecord")[0]
    expected = reference_ids(transformers.AutoTokenizer.from_pretrained(str(folder)), QWEN3_TOOL_CONVERSATION,
                             tools=QWEN3_TOOLS)
    assert record["input_ids"][:len(expected)].tolist() == expected


def test_tools_with_a_builtin_template_are_a_data_error():
    from mindsft.errors import DataError
    with pytest.raises(DataError, match="template 'qwen' cannot write"):
        get_template("qwen").segments(CONVERSATIONS[0], tools=QWEN3_TOOLS)


def test_baichuan2_with_a_sentencepiece_model_encodes_each_message_on_its_own(tmp_path):
    """Baichuan2 ships a SentencePiece tokenizer.model with <reserved_106>/<reserved_107> pieces;
    its code encodes each message separately between them, as mindsft's SentencePiece path does."""
    import io

    import sentencepiece as spm
    from mindsft.demo_model import sample_texts
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_texts()), model_writer=model, vocab_size=400, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        user_defined_symbols=["<reserved_106>", "<reserved_107>"], hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    ours = load_tokenizer(tmp_path / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    user, assistant = sp.PieceToId("<reserved_106>"), sp.PieceToId("<reserved_107>")
    for messages in CONVERSATIONS:
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        expected = sp.encode(system) if system else []
        for turn in messages[1:] if system else messages:
            expected += [user] + sp.encode(turn["content"]) + [assistant] if turn["role"] == "user" else \
                sp.encode(turn["content"]) + [sp.eos_id()]
        assert encode_segments(ours, get_template("baichuan2").segments(messages))[0] == expected
