"""The chat (tools/chat.py, run_mindformer.py --run_mode chat) in a pseudo-terminal: each turn's
reply is transformers' greedy reply to the conversation so far in the model's template, /clear
forgets it, /exit quits; a conversation longer than the context drops its oldest turns and says
so; the template is the one training recorded, else the tokenizer's chat_template, else raw."""
import io
import json
import sys

import pytest
import torch
import transformers

from mindsft.chat import chat_banner, run_chat
from mindsft.config import load_run_config
from mindsft.demo_model import write_tiny_hf_llama
from mindsft.loading import load_hf_weights
from mindsft.models.families import model_config_from_hf
from mindsft.models.llama import LlamaForCausalLM
from mindsft.session import GenerationSession, session_template
from mindsft.templates import get_template
from mindsft.tokenizer import load_tokenizer
from trainkit import ROOT, TINY_YAML, env

pexpect = pytest.importorskip("pexpect")

TEMPLATE = "vicuna_v1.1"
MAX_NEW = 16
SYSTEM = "You answer briefly."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat") / "hf"
    write_tiny_hf_llama(folder, seed=3, initializer_range=0.25)
    return folder


def greedy_reply(hf, tokenizer, messages, system=None):
    ids = get_template(TEMPLATE).encode_prompt(tokenizer, messages, system)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_NEW,
                          eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    new = out[0, len(ids):].tolist()
    return tokenizer.decode(new[:-1] if new and new[-1] == tokenizer.eos_id else new)


def test_a_terminal_session_replies_as_greedy_generation_over_the_history(model_dir):
    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(model_dir)
    # run_mindformer.py --run_mode chat is tools/chat.py.
    child = pexpect.spawn(sys.executable, [str(ROOT / "run_mindformer.py"), "--run_mode", "chat",
                                           "--config", str(TINY_YAML), "--load_checkpoint", str(model_dir),
                                           "--template", TEMPLATE, "--max_new_tokens", str(MAX_NEW),
                                           "--system", SYSTEM],
                          cwd=str(ROOT), env=dict(env(), PYTHONIOENCODING="utf-8"), encoding="utf-8",
                          codec_errors="replace", timeout=240, echo=False)
    try:
        child.expect_exact("/clear starts over, /exit quits.")
        child.expect_exact("User: ")

        def turn(text):
            child.sendline(text)
            child.expect_exact("\r\nUser: ")
            # The terminal writes each "\n" as "\r\n".
            return child.before.split("Assistant: ", 1)[1].replace("\r\n", "\n")

        history = [{"role": "user", "content": "What is the capital of France?"}]
        first = turn(history[-1]["content"])
        assert first == greedy_reply(hf, tokenizer, history, SYSTEM)
        history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And of Spain?"}]
        second = turn("And of Spain?")
        assert second == greedy_reply(hf, tokenizer, history, SYSTEM)
        assert second != greedy_reply(hf, tokenizer, history[-1:], SYSTEM)  # the history mattered

        child.sendline("/clear")
        child.expect_exact("(history cleared)")
        child.expect_exact("User: ")
        assert turn("And of Spain?") == greedy_reply(hf, tokenizer, history[-1:], SYSTEM)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_a_history_longer_than_the_context_drops_the_oldest_turns(model_dir):
    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(model_dir)
    with open(model_dir / "config.json") as f:
        model = LlamaForCausalLM(model_config_from_hf(json.load(f)))
    load_hf_weights(model, str(model_dir))
    template = get_template(TEMPLATE)
    questions = ["What is the capital of France?", "And of Spain?"]
    # Room for one question and its reply, not for two.
    one_turn = len(template.encode_prompt(tokenizer, [{"role": "user", "content": questions[0]}]))
    session = GenerationSession(model, tokenizer, template, {"max_new_tokens": MAX_NEW},
                                context_length=one_turn + MAX_NEW + 4)
    try:
        out = io.StringIO()
        run_chat(session, stdin=io.StringIO("\n".join(questions) + "\n"), stdout=out)
    finally:
        session.close()
    text = out.getvalue()
    assert text.startswith(chat_banner(session))
    assert "dropped the oldest 1 turn" in text
    replies = [part.split("\nUser: ")[0] for part in text.split("Assistant: ")[1:]]
    assert replies == [greedy_reply(hf, tokenizer, [{"role": "user", "content": q}]) for q in questions]


def test_the_template_is_the_recorded_one_else_the_tokenizers_chat_template_else_raw(tmp_path, bpe_dir):
    weights = tmp_path / "run" / "checkpoint" / "model.ckpt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    config = load_run_config(TINY_YAML, {"load_checkpoint": str(weights)})
    write_tiny_hf_llama(tmp_path / "sentencepiece")  # a tokenizer.model: no chat_template
    assert session_template(config, load_tokenizer(tmp_path / "sentencepiece"))[0] == "raw"
    assert session_template(config, load_tokenizer(bpe_dir)) == ("hf", "the tokenizer's chat_template")
    (tmp_path / "run" / "run_summary.json").write_text(json.dumps({"template": "chatml"}))
    assert session_template(config, load_tokenizer(bpe_dir))[0] == "chatml"
