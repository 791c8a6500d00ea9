"""An OpenAI-compatible HTTP API over a GenerationSession (FastAPI, uvicorn, sse-starlette).

GET /v1/models; POST /v1/chat/completions (messages in the model's template) and
POST /v1/completions (a raw prompt), streamed as server-sent events ending with `data: [DONE]`
or answered whole. Requests that arrive together decode together (mindsft.batching). A bad
request gets HTTP 4xx with OpenAI's error JSON and nothing is logged as a traceback; a failed
generation fails its own request only.
"""
import argparse
import asyncio
import json
import logging
import os
import sys
import time
import uuid

from mindsft.cli import HelpFormatter
from mindsft.errors import ConfigError, DataError, report, user_errors
from mindsft.session import (MODEL_FLAGS_EPILOG, ReplyText, RequestError, add_model_arguments, load_session,
                             parse_adapters, run_config_from_arguments)

log = logging.getLogger("mindsft.server")

MAX_STOP_STRINGS = 4
MAX_CHOICES = 8
# Request fields accepted and not acted on, when they ask for nothing this server would do differently.
IGNORED_WHEN_NEUTRAL = {"user": None, "logprobs": (None, False), "presence_penalty": (None, 0, 0.0),
                        "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "stream_options": None,
                        "parallel_tool_calls": None, "metadata": None, "store": (None, False),
                        "echo": (None, False), "best_of": (None, 1), "suffix": (None, "")}
SAMPLING_FIELDS = ("model", "stream", "max_tokens", "temperature", "top_p", "stop", "seed", "n")
CHAT_FIELDS = set(SAMPLING_FIELDS) | {"messages", "max_completion_tokens"} | set(IGNORED_WHEN_NEUTRAL)
COMPLETION_FIELDS = set(SAMPLING_FIELDS) | {"prompt"} | set(IGNORED_WHEN_NEUTRAL)


class ApiError(Exception):
    """An error answered as OpenAI answers it: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message, param=None, code=None):
    return ApiError(400, message, param, code)


# ---- reading a request ---------------------------------------------------------------------

def typed(body, name, kinds, kind_name, check=None, rule=""):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise bad(f"{name}: expected {kind_name}, got {json.dumps(value)[:60]}", name, "invalid_type")
    if check is not None and not check(value):
        raise bad(f"{name}: {json.dumps(value)[:60]} {rule}", name, "invalid_value")
    return value


def check_fields(body, allowed):
    for name in body:
        if name not in allowed:
            raise bad(f"unrecognized request argument supplied: {name}", name, "unknown_parameter")
    for name, neutral in IGNORED_WHEN_NEUTRAL.items():
        if neutral is not None and body.get(name) not in neutral and body.get(name) is not None:
            raise bad(f"{name}: {json.dumps(body[name])[:60]} is not supported by this server", name,
                      "unsupported_parameter")


def sampling_request(body):
    """The settings both endpoints take, validated as OpenAI documents them."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model: required, the name of a model GET /v1/models lists", "model",
                  "missing_required_parameter" if model is None else "invalid_type")
    max_tokens = typed(body, "max_completion_tokens", (int,), "an integer", lambda v: v >= 1, "must be >= 1")
    if max_tokens is None:
        max_tokens = typed(body, "max_tokens", (int,), "an integer", lambda v: v >= 1, "must be >= 1")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP_STRINGS:
        stops = list(stop)
    else:
        raise bad(f"stop: expected a string or a list of at most {MAX_STOP_STRINGS} strings", "stop", "invalid_type")
    stream = typed(body, "stream", (bool,), "a boolean") or False
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise bad("stream_options: expected an object", "stream_options", "invalid_type")
    return {
        "model": model, "stream": stream, "max_tokens": max_tokens, "stop": stops,
        "temperature": typed(body, "temperature", (int, float), "a number", lambda v: 0 <= v <= 2,
                             "must be between 0 and 2"),
        "top_p": typed(body, "top_p", (int, float), "a number", lambda v: 0 < v <= 1, "must be in (0, 1]"),
        "seed": typed(body, "seed", (int,), "an integer"),
        "n": typed(body, "n", (int,), "an integer", lambda v: 1 <= v <= MAX_CHOICES,
                   f"must be between 1 and {MAX_CHOICES}") or 1,
        "include_usage": bool((stream_options or {}).get("include_usage")),
    }


def message_text(content, index):
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad(f"messages[{index}].content: expected a string or a list of text parts", f"messages[{index}].content",
              "invalid_type")


def chat_messages(body):
    messages = body.get("messages")
    if messages is None:
        raise bad("messages: required, a list of {role, content}", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise bad("messages: expected a list of {role, content}", "messages", "invalid_type")
    if not messages:
        raise bad("messages: empty; give at least one user message", "messages", "invalid_value")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{index}]: expected an object with role and content", f"messages[{index}]",
                      "invalid_type")
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"messages[{index}].role: {json.dumps(role)[:40]} is not system, user or assistant",
                      f"messages[{index}].role", "invalid_value")
        out.append({"role": "system" if role == "developer" else role,
                    "content": message_text(message.get("content"), index)})
    return out


# ---- generating ----------------------------------------------------------------------------

class Choice:
    """One generated choice: its events arrive from the decode thread into an asyncio queue."""

    def __init__(self, session, index, stops):
        self.index = index
        self.text = ReplyText(session.tokenizer, session.stop_ids, stops)
        self.tokens = 0
        self.finish_reason = None
        self.request = None


async def generate_choices(session, loop, prompt_ids, settings, adapter, budget):
    """Yield (choice, text piece) as the choices' tokens arrive, then (choice, None) as each ends."""
    events = asyncio.Queue()
    choices = []
    try:
        for index in range(settings["n"]):
            choice = Choice(session, index, settings["stop"])
            seed = settings["config"].seed
            config = settings["config"] if seed is None or index == 0 else \
                settings["config"].updated(seed=seed + index)

            def sink(event, index=index):
                loop.call_soon_threadsafe(events.put_nowait, (index, event))
            choice.request = session.submit(prompt_ids, config, sink, adapter, budget)
            choices.append(choice)
        running = len(choices)
        while running:
            index, (kind, value) = await events.get()
            choice = choices[index]
            if choice.finish_reason is not None:
                continue
            if kind == "token":
                choice.tokens += 1
                piece = choice.text.add(value)
                if piece:
                    yield choice, piece
                if choice.text.stopped:
                    choice.request.cancel()
                    choice.finish_reason = "stop"
            elif kind == "error":
                raise ApiError(500, value, kind="server_error", code="generation_failed")
            else:
                piece = choice.text.finish()
                if piece:
                    yield choice, piece
                choice.finish_reason = "length" if value == "length" else "stop"
            if choice.finish_reason is not None:
                running -= 1
                yield choice, None
    finally:
        for choice in choices:
            choice.request.cancel()


def usage(prompt_ids, choices):
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
            "total_tokens": len(prompt_ids) + completion}


# ---- the app -------------------------------------------------------------------------------

def create_app(session, api_key=None):
    """The FastAPI app serving `session`; `api_key`: the bearer token every request must carry."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from sse_starlette.sse import EventSourceResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="mindsft", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    def error_response(err):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(ApiError)
    async def api_error(request, err):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err):
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(err.status_code,
                                                                                        str(err.detail))
        return error_response(ApiError(err.status_code, message, kind=kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err):
        return error_response(bad(f"invalid request: {err.errors()[:1]}"))

    @app.exception_handler(Exception)
    async def unexpected(request, err):
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(err).__name__, err)
        return error_response(ApiError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error"))

    @app.middleware("http")
    async def check_key(request, call_next):
        if api_key is not None and request.url.path.startswith("/v1"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error_response(ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                                               code="invalid_api_key"))
        return await call_next(request)

    async def read_body(request, allowed):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as err:
            raise bad(f"the request body is not valid JSON ({err})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object", code="invalid_json")
        check_fields(body, allowed)
        return body

    def prepare(settings, prompt_ids, prompt_param):
        try:
            adapter = session.adapter_of(settings["model"])
            config = session.settings(settings["max_tokens"], settings["temperature"], settings["top_p"],
                                      settings["seed"])
            budget = session.token_budget(prompt_ids, config, explicit=settings["max_tokens"] is not None)
        except RequestError as err:
            status = 404 if err.code == "model_not_found" else 400
            param = prompt_param if err.param == "messages" else err.param
            raise ApiError(status, str(err), param, err.code) from None
        except DataError as err:
            raise bad(str(err)) from None
        settings["config"] = config
        return adapter, budget

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "mindsft"}
                                           for name in session.model_names]}

    @app.get("/health")
    async def health():
        return {"status": "ok", **session.batcher.load()}

    async def respond(request, kind, settings, prompt_ids, adapter, budget):
        loop = asyncio.get_running_loop()
        reply_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        stamp = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        base = {"id": reply_id, "created": stamp, "model": settings["model"]}

        if not settings["stream"]:
            texts, choices = {}, {}

            async def collect():
                async for choice, piece in generate_choices(session, loop, prompt_ids, settings, adapter, budget):
                    choices[choice.index] = choice
                    if piece:
                        texts[choice.index] = texts.get(choice.index, "") + piece
            task = asyncio.ensure_future(collect())
            # A client that hangs up frees its rows (cancelling the task cancels its requests).
            while not task.done():
                await asyncio.wait([task], timeout=0.5)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    return JSONResponse(ApiError(499, "client disconnected").body(), status_code=499)
            task.result()
            out = []
            for index in sorted(choices):
                text = texts.get(index, "")
                entry = {"index": index, "finish_reason": choices[index].finish_reason, "logprobs": None}
                entry.update({"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text})
                out.append(entry)
            return {**base, "object": obj, "choices": out, "usage": usage(prompt_ids, list(choices.values()))}

        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(index, delta=None, finish_reason=None, text=None):
            if kind == "chat":
                choice = {"index": index, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
            return json.dumps({**base, "object": chunk_obj, "choices": [choice]}, ensure_ascii=False)

        async def events():
            finished = []
            if kind == "chat":
                for index in range(settings["n"]):
                    yield {"data": chunk(index, {"role": "assistant", "content": ""})}
            try:
                async for choice, piece in generate_choices(session, loop, prompt_ids, settings, adapter, budget):
                    if piece is None:
                        finished.append(choice)
                        yield {"data": chunk(choice.index, finish_reason=choice.finish_reason)}
                    elif kind == "chat":
                        yield {"data": chunk(choice.index, {"content": piece})}
                    else:
                        yield {"data": chunk(choice.index, text=piece)}
            except ApiError as err:
                yield {"data": json.dumps(err.body())}
                return
            if settings["include_usage"]:
                yield {"data": json.dumps({**base, "object": chunk_obj, "choices": [],
                                           "usage": usage(prompt_ids, finished)})}
            yield {"data": "[DONE]"}

        return EventSourceResponse(events(), ping=15)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request, CHAT_FIELDS)
        settings = sampling_request(body)
        messages = chat_messages(body)
        try:
            prompt_ids = session.chat_prompt(messages)
        except DataError as err:
            raise bad(f"messages: {err}", "messages", "invalid_value") from None
        adapter, budget = prepare(settings, prompt_ids, "messages")
        return await respond(request, "chat", settings, prompt_ids, adapter, budget)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, COMPLETION_FIELDS)
        settings = sampling_request(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if prompt is None:
            raise bad("prompt: required, a string", "prompt", "missing_required_parameter")
        if not isinstance(prompt, str):
            raise bad("prompt: expected a string (or a list of one string)", "prompt", "invalid_type")
        if not prompt:
            raise bad("prompt: empty", "prompt", "invalid_value")
        prompt_ids = session.text_prompt(prompt)
        adapter, budget = prepare(settings, prompt_ids, "prompt")
        return await respond(request, "completion", settings, prompt_ids, adapter, budget)

    return app


def serve(session, host="127.0.0.1", port=8000, api_key=None, log_level="info"):
    """Serve until SIGINT/SIGTERM (uvicorn stops accepting, lets open replies end, then the decode
    loop stops)."""
    import signal
    import uvicorn
    app = create_app(session, api_key)
    # uvicorn handles SIGTERM itself, then raises it again once stopped: a no-op handler lets
    # that second delivery pass, so the decode loop stops and the process exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        session.close()
    print("server stopped", flush=True)


DESCRIPTION = """Serve a model behind an OpenAI-compatible API: GET /v1/models, POST /v1/chat/completions and
POST /v1/completions, streamed (server-sent events) or whole. Requests that arrive together
decode together. Point any OpenAI client at http://HOST:PORT/v1.

    python tools/serve.py --config configs/llama2/finetune_llama_tiny_cpu.yaml \\
        --load_checkpoint output/checkpoint/llama_tiny_final.ckpt --vocab_file TOKENIZER_DIR \\
        [--adapter support=ADAPTER_DIR] [--port 8000] [--api_key KEY]

Needs the serve extra: pip install -e .[serve]
"""


def main(argv=None):
    """tools/serve.py and run_mindformer.py --run_mode serve."""
    parser = argparse.ArgumentParser(description=DESCRIPTION, epilog=MODEL_FLAGS_EPILOG, formatter_class=HelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--api_key", default=os.environ.get("MINDSFT_API_KEY"),
                        help="bearer token every request must send (default: $MINDSFT_API_KEY, else none)")
    parser.add_argument("--log_level", default="info", help="uvicorn's log level")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        try:
            import fastapi  # noqa: F401
            import sse_starlette  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as err:
            raise ConfigError(f"the server needs {err.name}: pip install -e .[serve]") from None
        config = run_config_from_arguments(parser, args, rest)
        session = load_session(config, parse_adapters(args.adapter), args.model_name, max_batch=args.max_batch)
        print(f"serving {', '.join(session.model_names)} on http://{args.host}:{args.port}/v1", flush=True)
        serve(session, args.host, args.port, args.api_key, args.log_level)
    except user_errors() as exc:
        report(exc)
        return 2
    return 0
