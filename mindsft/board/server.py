"""The board's HTTP layer: one static page and a JSON API over forms, jobs, preview and chat.

A wrong field is answered with HTTP 400 and `{"error": "<the command line's one line>"}`; the page
shows it and nothing is started. Training runs live in their output folders (by default under
`runs_dir`), short jobs (preprocess, eval, export) under `runs_dir/.jobs`: a board started again
finds them all.
"""
import asyncio
import contextlib
import json
import os
import time

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from mindsft.board import forms, jobs, preview
from mindsft.board.chat import ChatModel
from mindsft.errors import MindsftError
from mindsft.templates import TEMPLATE_NAMES

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
JOBS_FOLDER = ".jobs"
# Runs started outside runs_dir are listed here (one folder a line) so that the runs list finds them too.
RUNS_INDEX = "runs_elsewhere.txt"


class BadInput(Exception):
    """A field the command line would refuse: its one line goes back to the page."""


def one_line(exc):
    return "error: " + " ".join(str(exc).split())


def user_error_types():
    return (MindsftError, yaml.YAMLError, json.JSONDecodeError, BadInput)


def read_json_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_metrics(output_dir):
    rows = []
    try:
        with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue    # a line being written
    except OSError:
        pass
    return rows


def create_app(runs_dir):
    runs_dir = os.path.abspath(runs_dir)
    jobs_dir = os.path.join(runs_dir, JOBS_FOLDER)
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # Reached on SIGTERM / Ctrl-C once the server has closed its connections.
        print("mindsft board: stopped (runs it started go on; a board started again finds them)", flush=True)

    app = FastAPI(title="mindsft board", lifespan=lifespan)
    chat_state = {"model": None}
    chat_lock = asyncio.Lock()

    def is_board_run(folder):
        record = jobs.read_job(folder)
        return record is not None and record.get("kind") == "train"

    def start_short_job(kind, argv, info):
        folder = os.path.join(jobs_dir, f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}")
        record = jobs.start(folder, kind, argv, info)
        return {"job": os.path.basename(folder), "command": record["display"]}

    async def fields_of(request):
        try:
            fields = await request.json()
        except ValueError:
            raise BadInput("the request is not JSON") from None
        if not isinstance(fields, dict):
            raise BadInput("the request is not a JSON object of fields")
        return fields

    async def user_error(request, exc):
        return JSONResponse({"error": one_line(exc)}, status_code=400)

    for error_type in user_error_types():
        app.add_exception_handler(error_type, user_error)

    @app.get("/", response_class=HTMLResponse)
    def page():
        with open(PAGE, encoding="utf-8") as f:
            return f.read().replace("{{RUNS_DIR}}", runs_dir)

    @app.get("/api/info")
    def info():
        return {"runs_dir": runs_dir, "root": jobs.ROOT, "templates": list(TEMPLATE_NAMES),
                "default_output_dir": os.path.join(runs_dir, f"run-{time.strftime('%Y%m%d-%H%M%S')}")}

    # ---- Prepare
    @app.post("/api/model")
    async def model(request: Request):
        return preview.model_summary((await fields_of(request)).get("model"))

    @app.post("/api/data")
    async def data(request: Request):
        fields = await fields_of(request)
        return preview.data_summary(fields.get("data") or [], fields.get("tokenizer") or fields.get("model"),
                                    fields.get("template"), fields.get("seq_length") or None)

    @app.post("/api/preprocess/plan")
    async def preprocess_plan(request: Request):
        return {"command": jobs.display(forms.preprocess_command(await fields_of(request)))}

    @app.post("/api/preprocess")
    async def preprocess(request: Request):
        fields = await fields_of(request)
        argv = forms.preprocess_command(fields)
        return start_short_job("preprocess", argv, {"output_file": forms.path_of(fields.get("output_file"))})

    # ---- Train
    @app.post("/api/train/plan")
    async def train_plan(request: Request):
        plan = forms.train_plan(await fields_of(request), info()["default_output_dir"])
        return {"command": jobs.display(plan["argv"]), "yaml": plan["yaml"], "output_dir": plan["output_dir"],
                "yaml_path": plan["yaml_path"]}

    @app.post("/api/train")
    async def train(request: Request):
        plan = forms.train_plan(await fields_of(request), info()["default_output_dir"])
        forms.check_train_inputs(plan, is_board_run)
        os.makedirs(plan["output_dir"], exist_ok=True)
        with open(plan["yaml_path"], "w", encoding="utf-8") as f:
            f.write(plan["yaml"])
        record = jobs.start(plan["output_dir"], "train", plan["argv"],
                            {"workers": plan["config"].parallel_config.data_parallel})
        if os.path.dirname(plan["output_dir"]) != runs_dir:
            os.makedirs(runs_dir, exist_ok=True)
            with open(os.path.join(runs_dir, RUNS_INDEX), "a", encoding="utf-8") as f:
                f.write(plan["output_dir"] + "\n")
        return {"output_dir": plan["output_dir"], "command": record["display"], "yaml": plan["yaml"]}

    def run_folder(fields):
        folder = forms.path_of(fields.get("output_dir"))
        if not is_board_run(folder):
            raise BadInput(f"{folder}: not a training run the board started (no {jobs.JOB_FILE} in it)")
        return folder

    @app.get("/api/runs")
    def runs():
        folders = []
        if os.path.isdir(runs_dir):
            folders = [os.path.join(runs_dir, name) for name in sorted(os.listdir(runs_dir))]
        try:
            with open(os.path.join(runs_dir, RUNS_INDEX), encoding="utf-8") as f:
                folders += [line.strip() for line in f if line.strip()]
        except OSError:
            pass
        unique = list(dict.fromkeys(folders))
        return {"runs": [run_status(folder, metrics=False) for folder in unique if is_board_run(folder)]}

    def run_status(folder, metrics=True):
        record = jobs.read_job(folder)
        rows = read_metrics(folder)
        steps = [r for r in rows if "loss" in r]
        summary = read_json_file(os.path.join(folder, "run_summary.json")) or {}
        status = {"output_dir": folder, "name": os.path.basename(folder), "state": jobs.state(folder),
                  "command": record["display"], "started": record.get("started"),
                  "step": steps[-1]["step"] if steps else 0, "total_steps": summary.get("total_steps"),
                  "last": steps[-1] if steps else None}
        if metrics:
            status.update(metrics=rows, log=jobs.log_tail(folder, 30), error=None, summary=summary)
            with open(os.path.join(folder, forms.TRAIN_YAML), encoding="utf-8") as f:
                status["yaml"] = f.read()
            if status["state"] == "failed":
                status["error"] = jobs.error_line(folder)
        return status

    @app.post("/api/runs/status")
    async def status(request: Request):
        return run_status(run_folder(await fields_of(request)))

    @app.post("/api/runs/stop")
    async def stop(request: Request):
        folder = run_folder(await fields_of(request))
        return {"stopped": jobs.stop(folder), "state": jobs.state(folder)}

    @app.post("/api/runs/resume")
    async def resume(request: Request):
        folder = run_folder(await fields_of(request))
        if jobs.state(folder) == "running":
            raise BadInput(f"{folder}: the run is still running")
        record = jobs.read_job(folder)
        yaml_path = os.path.join(folder, forms.TRAIN_YAML)
        argv = forms.train_argv(yaml_path, int(record.get("workers", 1)), forms.free_port(),
                                os.path.join(folder, forms.MSRUN_LOG), resume=True)
        record = jobs.start(folder, "train", argv, {"workers": record.get("workers", 1)}, append_log=True)
        return {"output_dir": folder, "command": record["display"]}

    # ---- Short jobs: preprocess, eval, export
    @app.get("/api/jobs/{name}")
    def job(name: str):
        folder = os.path.join(jobs_dir, os.path.basename(name))
        record = jobs.read_job(folder)
        if record is None:
            raise BadInput(f"no job {name}")
        state = jobs.state(folder)
        result = {"state": state, "command": record["display"], "log": jobs.log_tail(folder, 30), "kind": record["kind"]}
        if state == "failed":
            result["error"] = jobs.error_line(folder)
        elif state == "finished":
            result["result"] = job_result(record)
        return result

    def job_result(record):
        if record["kind"] == "preprocess":
            return read_json_file(record["output_file"] + ".stats.json")
        if record["kind"] == "eval":
            return read_json_file(os.path.join(record["output_dir"], "eval_results.json"))
        if record["kind"] == "export":
            written = {}
            for path in record.get("outputs", []):
                if os.path.isdir(path):
                    written[path] = sorted(os.listdir(path))
                elif os.path.isfile(path):
                    written[path] = os.path.getsize(path)
            return {"written": written}
        return None

    @app.post("/api/eval/plan")
    async def eval_plan(request: Request):
        plan = forms.eval_plan(await fields_of(request))
        return {"command": jobs.display(plan["argv"]), "yaml": plan["yaml"]}

    @app.post("/api/eval")
    async def evaluate(request: Request):
        plan = forms.eval_plan(await fields_of(request))
        os.makedirs(plan["output_dir"], exist_ok=True)
        with open(plan["yaml_path"], "w", encoding="utf-8") as f:
            f.write(plan["yaml"])
        return start_short_job("eval", plan["argv"], {"output_dir": plan["output_dir"]})

    @app.post("/api/export/plan")
    async def export_plan(request: Request):
        return {"command": jobs.display(forms.export_command(await fields_of(request)))}

    @app.post("/api/export")
    async def export(request: Request):
        fields = await fields_of(request)
        argv = forms.export_command(fields)
        outputs = [forms.path_of(fields.get(k)) for k in ("merged_ckpt", "hf_output") if fields.get(k)]
        return start_short_job("export", argv, {"outputs": outputs})

    # ---- Chat
    @app.post("/api/chat/load")
    async def chat_load(request: Request):
        fields = await fields_of(request)
        async with chat_lock:
            if chat_state["model"] is not None:
                chat_state["model"].close()
            chat_state["model"] = None
            chat_state["model"] = await run_in_threadpool(ChatModel, fields.get("source"),
                                                          fields.get("tokenizer") or None, fields.get("template") or None)
            return chat_state["model"].describe()

    @app.post("/api/chat")
    async def chat(request: Request):
        fields = await fields_of(request)
        model = chat_state["model"]
        if model is None:
            raise BadInput("chat: load a model first")
        messages = fields.get("messages")
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "user":
            raise BadInput("chat: messages must end with the user's turn")
        pieces = model.stream(messages, fields.get("max_new_tokens") or 64)
        return StreamingResponse(pieces, media_type="text/plain; charset=utf-8")

    return app



def serve(host="127.0.0.1", port=7860, runs_dir="board_runs"):
    """Serve the board until SIGTERM or Ctrl-C: uvicorn closes its connections, runs the shutdown,
    then ends the process by that signal again (so the exit status says which signal stopped it)."""
    import uvicorn
    os.makedirs(runs_dir, exist_ok=True)
    print(f"mindsft board: http://{host}:{port}/ (runs in {os.path.abspath(runs_dir)})", flush=True)
    uvicorn.run(create_app(runs_dir), host=host, port=port, log_level="warning")
