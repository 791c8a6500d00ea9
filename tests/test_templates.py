"""The template registry renders what FastChat renders and the same text for training and inference."""
import json

import pytest

from conftest import shared_file
from mindsft.data.conversations import normalize_record, read_json_records
from mindsft.errors import ConfigError, DataError
from mindsft.demo_model import SAMPLE_ALPACA
from mindsft.templates import TEMPLATES, alpaca_prompt, get_template

pytest.importorskip("fastchat.conversation")
from fastchat.conversation import get_conv_template  # noqa: E402

FASTCHAT_ROLE = {"user": 0, "assistant": 1}


def fastchat_text(name, messages, system=None, generation_prompt=False):
    conv = get_conv_template(name)
    if system is not None:
        conv.set_system_message(system)
    for message in messages:
        conv.append_message(conv.roles[FASTCHAT_ROLE[message["role"]]], message["content"])
    if generation_prompt:
        conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def load_conversations(path):
    return [normalize_record(record) for record in read_json_records(path)]


def sharegpt_conversations():
    return load_conversations(shared_file("sharegpt/dummy_conversation.json"))


@pytest.mark.parametrize("name", ["vicuna_v1.1", "llama-2"])
@pytest.mark.parametrize("system", [None, "You are terse. {Braces} stay."])
def test_full_conversation_text_equals_fastchat(name, system):
    template = get_template(name)
    for messages in sharegpt_conversations():
        expected = fastchat_text(name, messages, system)
        if name == "llama-2":
            # FastChat's sep2 " </s><s>" opens a next round even after the last reply.
            assert expected.endswith("<s>")
            expected = expected[:-len("<s>")]
        assert template.render(messages, system) == expected


@pytest.mark.parametrize("name", ["vicuna_v1.1", "llama-2"])
def test_inference_prompt_at_every_user_turn_equals_fastchat(name):
    template = get_template(name)
    for messages in sharegpt_conversations()[:200]:
        for end in range(1, len(messages) + 1, 2):
            prompt = template.render_prompt(messages[:end])
            assert prompt == fastchat_text(name, messages[:end], generation_prompt=True)
            # the training text holds exactly this before the reply
            assert template.render(messages).startswith(prompt)


def test_vicuna_prompt_ends_at_the_assistant_tag():
    prompt = get_template("vicuna_v1.1").render_prompt([{"role": "user", "content": "hi"}])
    assert prompt.endswith(" USER: hi ASSISTANT:")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_trains_on_the_text_it_prompts_with(name):
    template = get_template(name)
    messages = [{"role": "system", "content": "Be brief."}] + load_conversations(SAMPLE_ALPACA)[0] + [
        {"role": "user", "content": "And again?"}, {"role": "assistant", "content": "Again."}]
    full = template.render(messages)
    for end in (2, 4):
        assert full.startswith(template.render_prompt(messages[:end]))
    learned = "".join(s.text for s in template.segments(messages) if s.learned and s.special is None)
    assert "Again." in learned and "Be brief." not in learned and "And again?" not in learned


CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_hf_chat_template_matches_the_builtin_chatml(tmp_path):
    from mindsft.templates import encode_segments
    from mindsft.tokenizer import LlamaTokenizer
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": CHATML_JINJA, "bos_token": "<s>", "eos_token": "</s>"}))
    hf, builtin = get_template("hf", config), get_template("chatml")
    tokenizer = LlamaTokenizer(shared_file("tokenizers/llama2/tokenizer.model"))
    for messages in sharegpt_conversations()[:50]:
        messages = [{"role": "system", "content": "S"}] + messages
        assert hf.render(messages) == builtin.render(messages)
        assert hf.render_prompt(messages[:2]) == builtin.render_prompt(messages[:2])
        assert encode_segments(tokenizer, hf.segments(messages)) == encode_segments(tokenizer, builtin.segments(messages))


def test_unknown_template_and_missing_chat_template_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown template 'vicuna'"):
        get_template("vicuna")
    with pytest.raises(ConfigError, match="needs the path"):
        get_template("hf")
    config = tmp_path / "tokenizer_config.json"
    config.write_text("{}")
    with pytest.raises(ConfigError, match="no chat_template"):
        get_template("hf", config)


def test_wrong_role_order_is_a_data_error():
    with pytest.raises(DataError, match="role 'assistant' where 'user' was expected"):
        get_template("vicuna_v1.1").render([{"role": "assistant", "content": "x"}])


def test_alpaca_prompt_keeps_braces_and_matches_stanford_format():
    from mindsft.templates import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT
    assert alpaca_prompt("Add 1", "x") == ALPACA_PROMPT_INPUT.format_map({"instruction": "Add 1", "input": "x"})
    assert alpaca_prompt("Add 1") == ALPACA_PROMPT_NO_INPUT.format_map({"instruction": "Add 1"})
    assert "\n### Instruction:\nint f() { return {x}; }\n" in alpaca_prompt("int f() { return {x}; }", "{input}")


OFFSET_TEXTS = ["héllo ASSISTANT: ünï 1 2 \n foo 😀", "  leading spaces", "", "日本語のテキスト\t\tend ",
                "😀 first", "x  y   z ", "a\u00a0b", "\n\nnew"]


def test_token_offsets_are_sentencepiece_offsets_with_a_byte_per_byte_piece():
    import sentencepiece as spm
    from mindsft.tokenizer import LlamaTokenizer
    path = shared_file("tokenizers/llama2/tokenizer.model")
    tokenizer = LlamaTokenizer(path)
    reference = spm.SentencePieceProcessor(model_file=str(path))
    for text in OFFSET_TEXTS + [m["content"] for c in sharegpt_conversations()[:200] for m in c]:
        proto = reference.encode(text, out_type="proto")
        ids, spans = tokenizer.encode_with_offsets(text)
        assert ids == [p.id for p in proto.pieces]
        for piece, span in zip(proto.pieces, spans):
            if not reference.IsByte(piece.id):
                assert span == (piece.begin, piece.end)
        # a byte piece spans its own byte (sentencepiece gives the whole character to its last
        # byte), so the spans tile the text and a span starting at a character covers all of it
        assert [begin for begin, _ in spans[1:]] == [end for _, end in spans[:-1]]
        assert [end - begin for (begin, end), p in zip(spans, proto.pieces) if reference.IsByte(p.id)] == \
            [1] * sum(reference.IsByte(p.id) for p in proto.pieces)
        assert not spans or spans[-1][1] == len(text.encode("utf-8"))


def test_offsets_from_piece_lengths_equal_sentencepiece_offset_mapping():
    """Llama's tokenizer does not normalize text, so running sums of piece lengths give the spans
    (the fast path); they equal the spans from sentencepiece's own offset mapping."""
    from mindsft.tokenizer import LlamaTokenizer
    tokenizer = LlamaTokenizer(shared_file("tokenizers/llama2/tokenizer.model"))
    tokenizer.encode_spans("")
    assert tokenizer._exact_pieces
    for text in OFFSET_TEXTS + [m["content"] for c in sharegpt_conversations()[:200] for m in c]:
        fast = tokenizer._piece_length_spans(text)
        assert fast is not None
        for got, expected in zip(fast, tokenizer._offset_mapping_spans(text)):
            assert got.tolist() == expected.tolist()


def test_a_normalizing_tokenizer_takes_sentencepiece_offsets(tiny_hf_dir):
    from mindsft.tokenizer import LlamaTokenizer
    tokenizer = LlamaTokenizer(tiny_hf_dir / "tokenizer.model")  # trained with NFKC normalization
    text = "ﬁne ①  spaced é"
    ids, begins, ends = tokenizer.encode_spans(text)
    assert not tokenizer._exact_pieces
    assert ids.tolist() == tokenizer.encode(text) and ends[-1] == len(text.encode("utf-8"))


def test_a_reply_starting_with_a_multibyte_character_learns_all_its_bytes():
    from mindsft.templates import encode_segments
    from mindsft.tokenizer import LlamaTokenizer
    tokenizer = LlamaTokenizer(shared_file("tokenizers/llama2/tokenizer.model"))
    template = get_template("chatml")  # the reply starts right after a newline, not after a space
    ids, learned = encode_segments(tokenizer, template.segments([
        {"role": "user", "content": "Smile?"}, {"role": "assistant", "content": "😀"}]))
    reply = [tokenizer.id_to_piece(i) for i, flag in zip(ids, learned) if flag]
    assert reply[:4] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


@pytest.mark.parametrize("name", ["vicuna_v1.1", "llama-2"])
def test_inference_prompt_ids_are_a_prefix_of_the_training_ids(name):
    from mindsft.templates import encode_segments
    from mindsft.tokenizer import LlamaTokenizer
    tokenizer = LlamaTokenizer(shared_file("tokenizers/llama2/tokenizer.model"))
    template = get_template(name)
    for messages in sharegpt_conversations()[:100]:
        ids, learned = encode_segments(tokenizer, template.segments(messages))
        for end in range(1, len(messages), 2):
            prompt_ids = template.encode_prompt(tokenizer, messages[:end])
            # the prompt's tokens open the training ids; learning starts on the very next token
            assert ids[:len(prompt_ids)] == prompt_ids
            assert not learned[len(prompt_ids) - 1] and learned[len(prompt_ids)]
