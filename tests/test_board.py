"""The web board in a real headless chromium: the page prepares the shipped sample, starts a
2-worker LoRA run whose loss chart fills, finds it running when reopened, stops and resumes it
to the losses of the command it showed run by hand, exports an HF folder transformers loads,
evaluates, and chats with the run (the reply is transformers' greedy generation). Wrong fields
show the command lines' one-line error and start nothing.

Screenshots of each tab are written to the test's tmp folder (look at them after a run)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SAMPLE = ROOT / "mindsft" / "sample_data" / "alpaca_sample.json"
SEQ_LENGTH = 128
QUESTION = "What is the capital of France?"

pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=120.0, what="the page"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def losses(output_dir):
    with open(Path(output_dir) / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(row["step"], row["loss"]) for row in rows if "loss" in row]


def eval_losses(output_dir):
    with open(Path(output_dir) / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(row["step"], row["eval_loss"]) for row in rows if "eval_loss" in row]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from mindsft.demo_model import write_tiny_hf_llama
    folder = tmp_path_factory.mktemp("board")
    write_tiny_hf_llama(folder / "tiny-hf")
    return folder


@pytest.fixture(scope="module")
def board(work):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    port = free_port()
    env = dict(os.environ, GLOG_v="3")
    log = open(work / "board.log", "w")
    process = subprocess.Popen([sys.executable, str(ROOT / "tools" / "board.py"), "--port", str(port),
                                "--runs_dir", str(work / "runs")], cwd=work, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"

    def up():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            assert process.poll() is None, (work / "board.log").read_text()
            return False
    wait_for(up, 60, "the board to listen")
    yield url
    process.send_signal(signal.SIGTERM)
    # SIGTERM stops the board cleanly, within seconds: its shutdown runs (uvicorn then re-raises the
    # signal, so the status names it).
    assert process.wait(timeout=20) in (0, -signal.SIGTERM)
    log.close()
    assert "mindsft board: stopped" in (work / "board.log").read_text()


@pytest.fixture(scope="module")
def browser(board):
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/setup_env.sh installs them)")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(flag)
    # The driver is named: Selenium Manager (which downloads drivers) never runs.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.get(board)
    yield driver
    driver.quit()


class Page:
    """The board's page in the browser: fields by id, tabs by name, waits on what it shows."""

    def __init__(self, driver, url):
        self.driver, self.url = driver, url

    def el(self, element_id):
        return self.driver.find_element("id", element_id)

    def text(self, element_id):
        found = self.driver.find_elements("id", element_id)
        return found[0].text if found else ""

    def tab(self, name):
        self.driver.find_element("css selector", f"nav button[data-tab='{name}']").click()

    def fill(self, **fields):
        from selenium.webdriver.support.ui import Select
        for element_id, value in fields.items():
            element = self.el(element_id.replace("_", "-"))
            if element.tag_name == "select":
                Select(element).select_by_visible_text(str(value)) if value else Select(element).select_by_index(0)
            else:
                element.clear()
                element.send_keys(str(value))

    def click(self, element_id):
        self.el(element_id).click()

    def wait_text(self, element_id, timeout=120.0):
        return wait_for(lambda: self.text(element_id).strip(), timeout, f"#{element_id} to show something")

    def wait_state(self, prefix, states=("finished",), timeout=180.0):
        state = wait_for(lambda: (self.text(f"{prefix}-state") not in ("", "running") and self.text(f"{prefix}-state"))
                         or (self.text(f"{prefix}-error") and "error"), timeout, f"#{prefix}-state to end")
        assert state in states, f"{prefix}: {state}: {self.text(prefix + '-error')}\n{self.text(prefix + '-log')}"
        return state

    def screenshot(self, path):
        self.driver.save_screenshot(str(path))

    def reload(self):
        self.driver.get(self.url)
        wait_for(lambda: self.el("prep-template").find_elements("tag name", "option"), 30, "the page to load")


@pytest.fixture
def page(browser, board):
    page = Page(browser, board)
    page.reload()
    return page


def test_board_prepares_trains_watches_resumes_exports_and_chats(page, work):
    hf, data_file = work / "tiny-hf", work / "data" / "train.mindrecord"

    # Prepare: the model's family and shape from its config, the data's counts and learned tokens.
    page.fill(prep_model=hf)
    page.click("prep-read-model")
    page.wait_text("model-info")
    assert "llama" in page.text("model-info") and "hidden_size 64" in page.text("model-info")
    page.fill(prep_data=SAMPLE, prep_template="alpaca", prep_seq=SEQ_LENGTH, prep_val="0.1", prep_output=data_file)
    page.click("prep-preview")
    page.wait_text("data-tokens")
    assert "75 records" in page.text("data-counts")
    learned = "".join(span.text for span in page.driver.find_elements("css selector", "#data-tokens .tok.learned"))
    # The reply is learned, and the token that ends it; the instruction and prompt are not.
    assert learned.startswith("The capital of France is Paris.") and "capital" not in learned[len("The capital"):]
    assert "Instruction" in page.text("data-tokens") and "Instruction" not in learned
    page.click("prep-run")
    page.wait_state("prep")
    stats = json.loads(page.text("prep-stats"))
    # A tenth of the records is set aside for evaluation, in data/eval.
    assert stats["records_written"] == 67 and stats["template"] == "alpaca" and stats["eval_dataset_dir"] == "eval"
    assert (data_file.parent / "train.mindrecord.stats.json").is_file()
    page.screenshot(work / "tab_prepare.png")

    # Train: the page's command, run by hand, is the reference for the page's own run.
    page.tab("train")
    assert page.el("train-data").get_attribute("value") == str(data_file.parent)
    page.fill(train_type="lora", train_lr="1e-3", train_epochs=4, train_batch=2, train_save=4, train_workers=2,
              train_eval_steps=8, train_output=work / "by_hand")
    page.click("train-plan")
    command = page.wait_text("train-command").split("\n")[-1]
    assert command.startswith("bash scripts/msrun_launcher.sh 'run_mindformer.py --config")
    assert "finetuning_type: lora" in page.text("train-yaml")
    (work / "by_hand").mkdir()
    (work / "by_hand" / "train.yaml").write_text(page.text("train-yaml") + "\n")
    by_hand = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=dict(os.environ, GLOG_v="3"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    run_dir = work / "runs" / "page_run"
    page.fill(train_output=run_dir)
    page.click("train-start")
    wait_for(lambda: int(page.el("chart-loss").get_attribute("data-count") or 0) >= 3, 180, "the loss chart to fill")
    assert page.text("run-state") == "running"
    assert float(page.text("run-speed")) > 0 and ":" in page.text("run-eta")
    page.screenshot(work / "tab_train.png")

    # Closed and reopened, the page finds the run running in its runs folder.
    page.reload()
    page.tab("train")
    row = wait_for(lambda: page.driver.find_elements("css selector", f"#runs tr[data-dir='{run_dir}']"), 10, "the run")
    assert "running" in row[0].text
    row[0].find_element("css selector", "button.watch").click()
    # Stop once a checkpoint is complete (step 4), mid-run; resume continues from it.
    wait_for(lambda: any((run_dir / "checkpoint" / "rank_0").glob("meta.json")) if (run_dir / "checkpoint").is_dir()
             else False, 120, "the first checkpoint")
    page.click("run-stop")
    wait_for(lambda: page.text("run-state") == "stopped", 30, "the run to stop")
    summary = json.loads((run_dir / "run_summary.json").read_text())
    steps_at_stop = len(losses(run_dir))
    assert steps_at_stop < summary["total_steps"]
    page.click("run-resume")
    wait_for(lambda: page.text("run-state") == "finished", 240, "the resumed run to finish")

    assert by_hand.wait(timeout=240) == 0, by_hand.stdout.read()[-3000:]
    hand, resumed = losses(work / "by_hand"), losses(run_dir)
    assert [s for s, _ in resumed] == list(range(1, summary["total_steps"] + 1))
    assert [s for s, _ in hand] == [s for s, _ in resumed]
    np.testing.assert_allclose([loss for _, loss in resumed], [loss for _, loss in hand], atol=1e-6, rtol=0)
    hand_eval, resumed_eval = eval_losses(work / "by_hand"), eval_losses(run_dir)
    assert [s for s, _ in resumed_eval] == list(range(8, summary["total_steps"] + 1, 8))
    assert [s for s, _ in hand_eval] == [s for s, _ in resumed_eval]
    np.testing.assert_allclose([v for _, v in resumed_eval], [v for _, v in hand_eval], atol=1e-6, rtol=0)
    assert int(page.el("chart-loss").get_attribute("data-count")) == summary["total_steps"]
    assert int(page.el("chart-eval").get_attribute("data-count")) == len(resumed_eval)
    page.screenshot(work / "tab_train_finished.png")

    # Export: the LoRA merged into its base, as a .ckpt and an HF folder transformers loads.
    page.tab("export")
    assert page.el("export-run").get_attribute("value") == str(run_dir)
    page.fill(export_merged=work / "merged.ckpt", export_hf=work / "merged-hf")
    page.click("export-run-btn")
    page.wait_state("export")
    assert "merged-hf" in page.text("export-result")
    page.screenshot(work / "tab_export.png")
    import torch
    import transformers
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(work / "merged-hf", dtype=torch.float32).eval()

    # Evaluate the exported model on the prepared data.
    page.tab("evaluate")
    assert page.el("eval-data").get_attribute("value") == str(data_file.parent)   # kept over the reload
    page.fill(eval_ckpt=work / "merged-hf", eval_data=data_file.parent / "eval", eval_output=work / "eval")
    page.click("eval-run")
    page.wait_state("eval")
    page.wait_text("eval-result")
    written = json.loads((work / "eval" / "eval_results.json").read_text())
    assert f"eval_loss {written['eval_loss']:.4f}" in page.text("eval-result")
    assert written["records"] == 8

    # Chat with the run (base + adapters) in its training template: transformers' greedy reply.
    assert page.el("chat-source").get_attribute("value") == str(run_dir)
    page.fill(chat_max=12)
    page.click("chat-load")
    wait_for(lambda: "template: alpaca" in page.text("chat-model") or page.text("chat-error"), 120, "the model")
    assert not page.text("chat-error")
    page.fill(chat_input=QUESTION)
    page.click("chat-send")
    reply = wait_for(lambda: page.driver.find_elements("css selector", "#chat-log .assistant[data-done='1']"),
                     120, "the reply")[0].text
    page.screenshot(work / "tab_chat.png")

    from mindsft.templates import get_template
    from mindsft.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(str(hf))
    prompt = get_template("alpaca").encode_prompt(tokenizer, [{"role": "user", "content": QUESTION}])
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                eos_token_id=hf_model.config.eos_token_id, pad_token_id=0)
    generated = out[0, len(prompt):].tolist()
    if hf_model.config.eos_token_id in generated:
        generated = generated[:generated.index(hf_model.config.eos_token_id)]
    assert reply == tokenizer.decode(generated).strip()
    assert reply, "the greedy reply is empty: nothing was compared"


@pytest.fixture(scope="module")
def prepared(work):
    """The shipped sample as MindRecord, written by the command line (not the page)."""
    out = work / "cli_data" / "train.mindrecord"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "llama_preprocess.py"), "--dataset_type", "qa",
                             "--input_glob", str(SAMPLE), "--model_file", str(work / "tiny-hf"), "--seq_length",
                             str(SEQ_LENGTH), "--output_file", str(out), "--template", "alpaca", "--no_progress"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out.parent


def board_processes():
    """Processes any board job started (they carry the board's tag in their environment)."""
    from mindsft.board.jobs import TAG
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"{TAG}=".encode() in Path(f"/proc/{name}/environ").read_bytes():
                found.append(name)
        except OSError:
            continue
    return found


def test_board_shows_the_command_lines_error_for_bad_fields_and_starts_nothing(page, work, prepared):
    hf = work / "tiny-hf"
    empty = work / "empty_folder"
    empty.mkdir(exist_ok=True)
    occupied = work / "occupied"
    occupied.mkdir(exist_ok=True)
    (occupied / "notes.txt").write_text("mine")
    broken = work / "broken.json"
    broken.write_text('[{"instruction": "a question", "output": ')
    def runs():
        return sorted(n for n in os.listdir(work / "runs") if n != ".jobs") if (work / "runs").is_dir() else []
    runs_before = runs()

    def shows(error_id, *fragments):
        text = wait_for(lambda: page.text(error_id), 60, f"#{error_id} to show the error")
        assert len(text.splitlines()) == 1 and text.startswith(("error:", "llama_preprocess.py: error:")), text
        for fragment in fragments:
            assert fragment in text, text
        return text

    # Prepare: a folder with no model; a data file that does not parse; outputs that the command refuses.
    page.fill(prep_model=empty)
    page.click("prep-read-model")
    shows("model-error", str(empty), "no config.json")
    page.fill(prep_model=hf, prep_data=broken, prep_template="alpaca", prep_seq=SEQ_LENGTH)
    page.click("prep-preview")
    shows("data-error", str(broken))
    page.fill(prep_data=SAMPLE, prep_output=empty)
    page.click("prep-run")
    shows("prep-error", str(empty), "existing folder")
    assert not os.listdir(empty)
    page.reload()
    page.fill(prep_model=hf, prep_data=SAMPLE, prep_seq="abc", prep_output=work / "never" / "x.mindrecord")
    page.click("prep-run")
    shows("prep-error", "seq_length", "abc")
    assert not (work / "never").exists()
    page.screenshot(work / "tab_prepare_error.png")

    # Train: each wrong field is refused before anything is written or started.
    page.tab("train")
    good = dict(train_model=hf, train_data=prepared, train_output=work / "runs" / "refused", train_epochs=1,
                train_workers=1, train_lr="1e-3", train_lora_target="all")
    bad_fields = [
        ({"train_epochs": "abc"}, ("runner_config.epochs", "abc")),
        ({"train_model": work / "no_such_model"}, ("no_such_model", "no such file or folder")),
        ({"train_data": empty}, (str(empty), "no MindRecord files")),
        ({"train_output": occupied}, (str(occupied), "holds other files")),
        ({"train_lr": "fast"}, ("learning_rate", "fast")),
        ({"train_workers": "0"}, ("data_parallel", "at least 1")),
        ({"train_lora_target": "no_such_proj"}, ("no_such_proj",)),
    ]
    for change, fragments in bad_fields:
        page.fill(**{**good, **change})
        page.click("train-start")
        shows("train-error", *fragments)
        assert not (work / "runs" / "refused").exists()
    page.screenshot(work / "tab_train_error.png")
    assert (occupied / "notes.txt").read_text() == "mine" and sorted(os.listdir(occupied)) == ["notes.txt"]

    # Evaluate, chat and export: a checkpoint that is not there, a folder with no model, a folder that is no run.
    page.tab("evaluate")
    page.fill(eval_ckpt=work / "missing.ckpt", eval_data=prepared, eval_output=work / "eval_refused")
    page.click("eval-run")
    shows("eval-error", "missing.ckpt", "no such file or folder")
    assert not (work / "eval_refused").exists()
    page.fill(chat_source=empty)
    page.click("chat-load")
    shows("chat-error", str(empty))
    page.tab("export")
    page.fill(export_run=empty, export_hf=work / "export_refused")
    page.click("export-run-btn")
    shows("export-error", str(empty), "not a board training run")
    assert not (work / "export_refused").exists()

    assert runs() == runs_before
    assert not board_processes()
