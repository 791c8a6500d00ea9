"""The continuous-batching decode loop: sequences that join a running batch at different steps,
with prompts of different lengths, through cache moves at the end of the slots, each get
exactly transformers' greedy reply as if alone; a cancelled one gives its row up at once; a
failed one fails alone."""
import json
import queue
import threading

import pytest
import torch
import transformers

from mindsft.demo_model import write_tiny_hf_llama
from mindsft.loading import load_hf_weights
from mindsft.models.families import model_config_from_hf
from mindsft.models.llama import LlamaForCausalLM
from mindsft.session import GenerationSession
from mindsft.templates import get_template
from mindsft.tokenizer import load_tokenizer

MAX_NEW = 20
PROMPTS = ["The capital of France is", "Once upon a time", "Three tips for staying healthy are",
           "The sea", "A poem about the wind that blows over the hills and the sea:", "Birds fly because",
           "Two plus two is", "The best way to learn is", "Cats are", "In the morning I"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batching") / "hf"
    write_tiny_hf_llama(folder, seed=3, initializer_range=0.25)
    with open(folder / "config.json") as f:
        model = LlamaForCausalLM(model_config_from_hf(json.load(f)))
    load_hf_weights(model, str(folder))
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, hf, load_tokenizer(folder)


def test_sequences_joining_at_different_steps_get_their_greedy_replies(models):
    model, hf, tokenizer = models
    # A context of 48 tokens (64 slots): the write slot reaches the end and the rows move.
    session = GenerationSession(model, tokenizer, get_template("raw"), {"max_new_tokens": MAX_NEW},
                                context_length=48, max_batch=4)
    prompts = [session.text_prompt(p) for p in PROMPTS]
    config = session.settings(temperature=0)
    replies = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]
    started = [threading.Event() for _ in prompts]

    def sink(index):
        def receive(event):
            if event[0] == "token":
                replies[index].append(event[1])
                if len(replies[index]) == 5:
                    started[index].set()
            else:
                started[index].set()
                done[index].set()
        return receive
    try:
        for index, prompt in enumerate(prompts):
            session.submit(prompt, config, sink(index))
            # The next one arrives while this one is 5 tokens in.
            assert started[index].wait(120)
        for event in done:
            assert event.wait(120)
        moves = session.batcher.moves
    finally:
        session.close()
    for prompt, reply in zip(prompts, replies):
        with torch.no_grad():
            # A reply has what the context leaves after its prompt, at most max_new_tokens.
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=min(MAX_NEW, 48 - len(prompt)),
                              eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        assert reply == out[0, len(prompt):].tolist()
    assert moves >= 1 and max(len(p) for p in prompts) > 48 - MAX_NEW


def test_a_cancelled_sequence_gives_its_row_up(models):
    model, _, tokenizer = models
    session = GenerationSession(model, tokenizer, get_template("raw"), {"max_new_tokens": 200}, max_batch=2)
    events = queue.Queue()
    try:
        request = session.submit(session.text_prompt(PROMPTS[0]), session.settings(temperature=0), events.put)
        assert events.get(timeout=120)[0] == "token"
        request.cancel()
        while True:
            kind, value = events.get(timeout=120)
            if kind != "token":
                break
        assert (kind, value) == ("done", "cancelled")
        assert session.batcher.load() == {"running": 0, "waiting": 0, "cancelled": 1}
    finally:
        session.close()



def run_to_end(session, prompt):
    events = queue.Queue()
    session.submit(prompt, session.settings(temperature=0), events.put)
    tokens = []
    while True:
        kind, value = events.get(timeout=120)
        if kind != "token":
            return tokens, (kind, value)
        tokens.append(value)


def test_a_failed_generation_fails_its_request_and_the_next_one_succeeds(models):
    model, hf, tokenizer = models
    session = GenerationSession(model, tokenizer, get_template("raw"), {"max_new_tokens": 8}, max_batch=2)
    prompt = session.text_prompt(PROMPTS[0])
    try:
        _, end = run_to_end(session, [tokenizer.bos_id, 10 ** 6])  # an id past the vocabulary
        tokens, after = run_to_end(session, prompt)
    finally:
        session.close()
    assert end[0] == "error" and "generation failed" in end[1]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8,
                          eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    assert tokens == out[0, len(prompt):].tolist() and after[0] == "done"
