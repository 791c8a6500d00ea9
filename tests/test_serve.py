"""tools/serve.py as a real process on a free 127.0.0.1 port, spoken to with the official `openai`
client: replies equal transformers' greedy generate for the same tiny model and template (whole,
streamed, concurrent, through a LoRA adapter), usage and stop strings as OpenAI documents them,
bad requests answered with OpenAI's error JSON while the server keeps serving, SIGTERM stops it."""
import json
import signal
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")
try:  # the HTTP client the openai package is built on (httpx2 from openai 3 on)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")
peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mindsft.convert.convert import hf_to_ms, model_config_path  # noqa: E402
from mindsft.demo_model import write_tiny_hf_llama  # noqa: E402
from mindsft.templates import get_template  # noqa: E402
from mindsft.tokenizer import load_tokenizer  # noqa: E402
from trainkit import ROOT, TINY_YAML, env, free_port  # noqa: E402

pytestmark = pytest.mark.slow

API_KEY = "test-key"
TEMPLATE = "vicuna_v1.1"
MAX_NEW = 24
QUESTIONS = ["What is the capital of France?", "Give three tips for staying healthy.",
             "Write a short poem about the sea.", "Name a colour.", "How do birds fly?",
             "Describe a cat in one sentence.", "What is 2+2?", "Tell me a story."]


class Served:
    def __init__(self, process, port, log_path, tokenizer, hf, merged):
        self.process, self.port, self.log_path = process, port, log_path
        self.tokenizer, self.hf, self.merged = tokenizer, hf, merged
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.client = openai.OpenAI(base_url=self.base_url, api_key=API_KEY, max_retries=0, timeout=120)
        self.template = get_template(TEMPLATE)

    def prompt_ids(self, messages):
        return self.template.encode_prompt(self.tokenizer, messages)

    def reference(self, prompt_ids, model=None, max_new_tokens=MAX_NEW):
        """(text, new token count) of transformers' greedy generate: the reply stops at EOS, which
        counts as a generated token and is not part of the text."""
        with torch.no_grad():
            out = (model or self.hf).generate(torch.tensor([prompt_ids]), do_sample=False,
                                              max_new_tokens=max_new_tokens, eos_token_id=self.tokenizer.eos_id,
                                              pad_token_id=self.tokenizer.pad_id)
        new = out[0, len(prompt_ids):].tolist()
        text_ids = new[:-1] if new and new[-1] == self.tokenizer.eos_id else new
        return self.tokenizer.decode(text_ids), len(new)

    def chat_reference(self, question, model=None):
        return self.reference(self.prompt_ids([{"role": "user", "content": question}]), model)

    def log(self):
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny Llama as a .ckpt (with its config beside it), a PEFT adapter on it, and the server."""
    root = tmp_path_factory.mktemp("serve")
    hf_dir = root / "hf"
    write_tiny_hf_llama(hf_dir, seed=3, initializer_range=0.25)
    ckpt = root / "model.ckpt"
    hf_to_ms(str(hf_dir), str(ckpt), config_path=model_config_path(str(ckpt)), progress=False)
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    lora = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                               peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                               target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    lora.save_pretrained(root / "tuned")
    merged = lora.merge_and_unload().eval()

    port = free_port()
    log_path = root / "server.log"
    command = [sys.executable, str(ROOT / "tools" / "serve.py"), "--config", str(TINY_YAML),
               "--load_checkpoint", str(ckpt), "--vocab_file", str(hf_dir), "--template", TEMPLATE,
               "--max_new_tokens", str(MAX_NEW), "--adapter", f"tuned={root / 'tuned'}", "--port", str(port),
               "--api_key", API_KEY]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT)
    served = Served(process, port, log_path, load_tokenizer(hf_dir), hf, merged)
    deadline = time.time() + 240
    while True:
        assert process.poll() is None, served.log()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, served.log()[-3000:]
        time.sleep(0.5)
    yield served
    if process.poll() is None:
        process.kill()
        process.wait()


def chat(served, question, model="mindsft", temperature=0, **settings):
    return served.client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=temperature, **settings)


def test_models_lists_the_base_and_its_adapters(served):
    assert sorted(m.id for m in served.client.models.list().data) == ["mindsft", "tuned"]


def test_chat_reply_and_usage_equal_transformers_greedy(served):
    question = QUESTIONS[0]
    expected, new_tokens = served.chat_reference(question)
    reply = chat(served, question)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    prompt_tokens = len(served.prompt_ids([{"role": "user", "content": question}]))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, new_tokens)
    assert reply.usage.total_tokens == prompt_tokens + new_tokens
    assert len(set(expected.split())) >= 3


def test_finish_reason_is_stop_at_eos_and_length_at_max_tokens(served):
    replies = {q: served.chat_reference(q) for q in QUESTIONS}
    short = next(q for q, (_, count) in replies.items() if count < MAX_NEW)
    assert chat(served, short).choices[0].finish_reason == "stop"
    reply = chat(served, QUESTIONS[0], max_tokens=5)
    expected, _ = served.reference(served.prompt_ids([{"role": "user", "content": QUESTIONS[0]}]), max_new_tokens=5)
    assert (reply.choices[0].finish_reason, reply.choices[0].message.content) == ("length", expected)
    assert reply.usage.completion_tokens == 5


def test_streamed_chunks_join_to_the_whole_reply(served):
    question = QUESTIONS[1]
    whole = chat(served, question).choices[0].message.content
    stream = chat(served, question, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    assert "".join(pieces) == whole == served.chat_reference(question)[0]
    assert len(pieces) > 3 and len(finish) == 1
    assert usage.completion_tokens == served.chat_reference(question)[1]


def test_stop_strings_end_the_reply_before_them(served):
    question = QUESTIONS[0]
    expected, _ = served.chat_reference(question)
    stop = expected[6:9]
    assert stop.strip()
    cut = expected[:expected.find(stop)]
    reply = chat(served, question, stop=[stop, "never-generated"])
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (cut, "stop")
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chat(served, question, stop=stop, stream=True)
                       if chunk.choices)
    assert streamed == cut


def test_completions_continue_a_raw_prompt(served):
    prompt = "The capital of France is"
    ids = get_template("raw").encode_prompt(served.tokenizer, [{"role": "user", "content": prompt}])
    expected, count = served.reference(ids, max_new_tokens=12)
    reply = served.client.completions.create(model="mindsft", prompt=prompt, max_tokens=12, temperature=0)
    assert reply.choices[0].text == expected
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), count)
    streamed = "".join(c.choices[0].text for c in served.client.completions.create(
        model="mindsft", prompt=prompt, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == expected


def test_n_choices_and_seeded_sampling(served):
    greedy = chat(served, QUESTIONS[2], n=2)
    expected = served.chat_reference(QUESTIONS[2])[0]
    assert [c.message.content for c in greedy.choices] == [expected, expected]
    first = chat(served, QUESTIONS[2], temperature=1.0, seed=7, n=2)
    again = chat(served, QUESTIONS[2], temperature=1.0, seed=7, n=2)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.choices[0].message.content != first.choices[1].message.content


def test_eight_concurrent_clients_get_the_replies_of_one_at_a_time(served):
    expected = [served.chat_reference(q)[0] for q in QUESTIONS]
    one_at_a_time = [chat(served, q).choices[0].message.content for q in QUESTIONS]
    together = [None] * len(QUESTIONS)

    def ask(index):
        stream = index % 2 == 1
        if stream:
            together[index] = "".join(c.choices[0].delta.content or "" for c in chat(served, QUESTIONS[index],
                                                                                   stream=True) if c.choices)
        else:
            together[index] = chat(served, QUESTIONS[index]).choices[0].message.content
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert one_at_a_time == expected
    assert together == expected


def test_adapter_names_give_the_base_and_the_merged_model_replies(served):
    question = QUESTIONS[3]
    base, _ = served.chat_reference(question)
    merged, _ = served.chat_reference(question, served.merged)
    assert base != merged
    assert chat(served, question, model="tuned").choices[0].message.content == merged
    assert chat(served, question, model="mindsft").choices[0].message.content == base
    # Requests for both at once: each still gets its own model's reply.
    replies = {}
    threads = [threading.Thread(target=lambda m=m: replies.__setitem__(m, chat(served, question, model=m)))
               for m in ("tuned", "mindsft", "tuned")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert replies["tuned"].choices[0].message.content == merged
    assert replies["mindsft"].choices[0].message.content == base


LONG = "word " * 400
BAD_CHAT_BODIES = [
    ("{not json", "invalid_json"), ("[1, 2]", "invalid_json"), ('"text"', "invalid_json"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": 12, "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "mindsft"}, "messages"),
    ({"model": "mindsft", "messages": "hi"}, "messages"),
    ({"model": "mindsft", "messages": []}, "messages"),
    ({"model": "mindsft", "messages": ["hi"]}, "messages[0]"),
    ({"model": "mindsft", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"model": "mindsft", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "mindsft", "messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"model": "mindsft", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "messages"),
    ({"model": "mindsft", "messages": [{"role": "user", "content": LONG}]}, "messages"),
    ({"model": "mindsft", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "mindsft", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, "max_tokens"),
    ({"model": "mindsft", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "max_tokens"),
    ({"model": "mindsft", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
    ({"model": "mindsft", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"model": "mindsft", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"model": "mindsft", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
     "stop"),
    ({"model": "mindsft", "messages": [{"role": "user", "content": "hi"}], "stop": 3}, "stop"),
    ({"model": "mindsft", "messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"model": "mindsft", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ({"model": "mindsft", "messages": [{"role": "user", "content": "hi"}], "seed": "x"}, "seed"),
    ({"model": "mindsft", "messages": [{"role": "user", "content": "hi"}], "foo": 1}, "foo"),
    ({"model": "mindsft", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
]
BAD_COMPLETION_BODIES = [
    ({"model": "mindsft"}, "prompt"), ({"model": "mindsft", "prompt": 5}, "prompt"),
    ({"model": "mindsft", "prompt": ""}, "prompt"), ({"model": "mindsft", "prompt": LONG}, "prompt"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    answered = []
    with httpx.Client(base_url=f"http://127.0.0.1:{served.port}", timeout=60) as http:
        cases = [("/v1/chat/completions", body, param) for body, param in BAD_CHAT_BODIES]
        cases += [("/v1/completions", body, param) for body, param in BAD_COMPLETION_BODIES]
        for path, body, param in cases:
            data = body if isinstance(body, str) else json.dumps(body)
            response = http.post(path, content=data, headers=headers)
            error = response.json()["error"]
            answered.append((path, data[:60], response.status_code, error["type"], error["param"] or error["code"]))
            assert 400 <= response.status_code < 500, answered[-1]
            assert isinstance(error["message"], str) and error["message"], answered[-1]
            assert param in (error["param"] or error["code"] or ""), answered[-1]
        for method, path, key, status in [("GET", "/v1/chat/completions", API_KEY, 405),
                                          ("GET", "/v1/nothing", API_KEY, 404),
                                          ("GET", "/v1/models", None, 401), ("GET", "/v1/models", "wrong", 401),
                                          ("POST", "/v1/chat/completions", "wrong", 401)]:
            auth = {"Authorization": f"Bearer {key}"} if key else {}
            response = http.request(method, path, headers=auth)
            assert response.status_code == status and "message" in response.json()["error"], (method, path)
    assert len(answered) >= 20
    with pytest.raises(openai.NotFoundError):
        chat(served, "hi", model="missing")
    with pytest.raises(openai.BadRequestError):
        chat(served, "hi", max_tokens=0)
    assert chat(served, QUESTIONS[0]).choices[0].message.content == served.chat_reference(QUESTIONS[0])[0]
    assert "Traceback" not in served.log()


def test_a_client_leaving_mid_stream_does_not_stall_the_others(served):
    body = {"model": "mindsft", "messages": [{"role": "user", "content": QUESTIONS[4]}], "stream": True,
            "max_tokens": 200, "temperature": 0}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{served.port}", timeout=60) as http:
        cancelled = http.get("/health").json()["cancelled"]
        with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in received)
        # The others are answered as if alone, and the left stream's row is given up.
        expected = [served.chat_reference(q)[0] for q in QUESTIONS[:3]]
        replies = [None] * 3
        threads = [threading.Thread(target=lambda i=i: replies.__setitem__(
            i, chat(served, QUESTIONS[i]).choices[0].message.content)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert replies == expected
        health = http.get("/health").json()
        assert health["cancelled"] == cancelled + 1 and health["running"] == 0


def test_sigterm_stops_the_server_cleanly(served):
    # Last in the module: it ends the module's server.
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(60) == 0
    log = served.log()
    assert "server stopped" in log and "Traceback" not in log
