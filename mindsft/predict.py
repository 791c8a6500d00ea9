"""run_mode predict: ask the model prompts in its training template, write its replies, and
score them when the records carry answers (BLEU-4, ROUGE-1/2/L, loss and perplexity).

Prompts come from a string, a `.txt` file (one prompt a line) or a `.json`/`.jsonl` file of
alpaca, ShareGPT or OpenAI-messages records; a record that ends with an assistant turn gives
that turn as the label. Output: `generated_predictions.jsonl` (prompt, label, predict) and
`predict_results.json` (metrics and speed) in `output_dir`.
"""
import dataclasses
import json
import math
import os
import sys
import time
from typing import List, Optional

import numpy as np
import mindspore as ms
from tqdm import tqdm

from mindsft.data.conversations import normalize_record, read_json_records
from mindsft.data.schema import IGNORE_INDEX, dataset_manifest, recorded_template
from mindsft.errors import ConfigError, DataError
from mindsft.output_files import atomic_output
from mindsft.generate import GenerationConfig, Generator
from mindsft.input_files import read_json
from mindsft.loading import build_model, load_start_weights
from mindsft.metrics import similarity_scores
from mindsft.templates import encode_segments, get_template
from mindsft.tokenizer import load_tokenizer
from mindsft.train.evaluate import loss_terms_over

PROMPT_FILE_SUFFIXES = (".txt", ".json", ".jsonl")
PREDICTIONS_FILE = "generated_predictions.jsonl"
RESULTS_FILE = "predict_results.json"


@dataclasses.dataclass
class PromptRecord:
    """One question: the conversation up to the reply, and the reference reply if known."""
    messages: List[dict]
    label: Optional[str] = None


def load_prompt_records(predict_data):
    """PromptRecords from a prompt string, a list of strings, or a .txt/.json/.jsonl file."""
    if isinstance(predict_data, (list, tuple)):
        return [PromptRecord([{"role": "user", "content": str(p)}]) for p in predict_data]
    text = os.fspath(predict_data)
    if os.path.isfile(text):
        suffix = os.path.splitext(text)[1].lower()
        if suffix == ".txt":
            return read_prompt_lines(text)
        if suffix in (".json", ".jsonl"):
            return read_prompt_records(text)
        raise DataError(f"{text}: predict_data files must be .txt (one prompt a line) or .json/.jsonl records")
    if text.lower().endswith(PROMPT_FILE_SUFFIXES) and "\n" not in text:
        raise DataError(f"{text}: prompt file not found")
    if not text.strip():
        raise DataError("predict_data is an empty prompt")
    return [PromptRecord([{"role": "user", "content": text}])]


def read_prompt_lines(path):
    try:
        with open(path, encoding="utf-8") as f:
            # One prompt per "\n"-ended line; a U+2028 inside a prompt stays part of it.
            lines = [line.rstrip("\r") for line in f.read().split("\n")]
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None
    records = [PromptRecord([{"role": "user", "content": line}]) for line in lines if line.strip()]
    if not records:
        raise DataError(f"{path}: no prompts (every line is empty)")
    return records


def read_prompt_records(path):
    records = []
    for index, record in enumerate(read_json_records(path)):
        try:
            messages = normalize_record(record)
        except DataError as err:
            raise DataError(f"{path}: record {index}: {err}") from None
        label = None
        if messages[-1]["role"] == "assistant":
            label = messages[-1]["content"]
            messages = messages[:-1]
        records.append(PromptRecord(messages, label))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def teacher_forced_loss(model, tokenizer, template, records, batch_size=8):
    """(summed cross-entropy, learned-token count) of the labels given their prompts: the
    training loss of these conversations, on the tokens the model would learn."""
    examples = []
    for record in records:
        conversation = record.messages + [{"role": "assistant", "content": record.label}]
        ids, learned = encode_segments(tokenizer, template.segments(conversation))
        examples.append((ids, [t if keep else IGNORE_INDEX for t, keep in zip(ids, learned)]))
    examples.sort(key=lambda e: len(e[0]))

    def batches():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            length = max(len(ids) for ids, _ in chunk)
            input_ids = np.full((len(chunk), length), tokenizer.pad_id, np.int32)
            labels = np.full((len(chunk), length), IGNORE_INDEX, np.int32)
            for row, (ids, row_labels) in enumerate(chunk):
                input_ids[row, :len(ids)], labels[row, :len(ids)] = ids, row_labels
            yield {"input_ids": input_ids, "labels": labels}
    return loss_terms_over(model, batches())


class StreamPrinter:
    """Prints a single reply as it is generated (decoding all tokens so far, so that
    sentencepiece's word-initial spaces come out right)."""

    def __init__(self, tokenizer, stop_ids, out):
        self.tokenizer, self.stop_ids, self.out = tokenizer, set(stop_ids), out
        self.tokens, self.printed = [], ""

    def __call__(self, tokens, active):
        if active[0] and int(tokens[0]) not in self.stop_ids:
            self.tokens.append(int(tokens[0]))
            text = self.tokenizer.decode(self.tokens)
            # A partial UTF-8 character decodes as U+FFFD: wait for the rest of it.
            if text.startswith(self.printed) and not text.endswith("\ufffd"):
                self.out.write(text[len(self.printed):])
                self.out.flush()
                self.printed = text

    def finish(self):
        self.out.write("\n")
        self.out.flush()


def generation_settings(generation_config, tokenizer, template):
    """The GenerationConfig of a predict run: the given settings, stopping at every end token of the
    model (generation_config.json may list several, as Llama 3.1's does) and at the template's turn
    end, padding with the tokenizer's pad id."""
    if not isinstance(generation_config, GenerationConfig):
        generation_config = GenerationConfig.from_mapping(generation_config or {})
    if generation_config.eos_token_id is None:
        generation_config = generation_config.updated(eos_token_id=list(tokenizer.end_ids) or None)
    if generation_config.pad_token_id is None:
        generation_config = generation_config.updated(pad_token_id=tokenizer.pad_id)
    if template.end_token not in ("eos", None):
        # Llama 3's <|eot_id|> stops a reply even where the eos is another token (a base model's).
        end_id = tokenizer.special_id(template.end_token)
        if end_id not in generation_config.stop_token_ids:
            generation_config = generation_config.updated(
                stop_token_ids=list(generation_config.stop_token_ids) + [end_id])
    return generation_config


def run_predict(model, tokenizer, predict_data, generation_config=None, template_name="raw",
                output_dir=None, batch_size=8, tokenizer_config_path=None, stream=None,
                compute_loss=True, show_progress=True):
    """Generate replies for `predict_data` and, when records have labels, score them.

    model: a LlamaForCausalLM with weights loaded; tokenizer: a mindsft tokenizer (`load_tokenizer`);
    generation_config: a GenerationConfig or a mapping of HF generation_config keys;
    template_name: the training data's template (`raw` for plain completion);
    output_dir: where generated_predictions.jsonl and predict_results.json go (None: not written);
    stream: a text stream to print a single prompt's reply as it grows (None: stdout when there
    is exactly one prompt; False: never). Returns {"predictions": [...], "metrics": {...}}.
    """
    template = get_template(template_name or "raw", tokenizer_config_path, tokenizer)
    generation_config = generation_settings(generation_config, tokenizer, template)
    records = load_prompt_records(predict_data)
    prompts_text = [template.render_prompt(r.messages) for r in records]
    prompts_ids = [template.encode_prompt(tokenizer, r.messages) for r in records]
    stop_ids = generation_config.stop_ids(model.config)

    generator = Generator(model)
    printer = None
    if stream is None and len(records) == 1:
        stream = sys.stdout
    # Beam search knows its best reply only at the end: nothing to stream.
    if stream and len(records) == 1 and int(generation_config.num_beams) == 1:
        printer = StreamPrinter(tokenizer, stop_ids, stream)

    # Similar lengths share a batch so that little padding is computed.
    order = sorted(range(len(records)), key=lambda i: len(prompts_ids[i]))
    replies = [None] * len(records)
    totals = {"prefill_tokens": 0, "timed_prefill_tokens": 0, "prefill_seconds": 0.0, "decode_tokens": 0,
              "decode_seconds": 0.0, "compile_seconds": 0.0}
    stopped_count = 0
    batches = range(0, len(order), batch_size)
    start_time = time.perf_counter()
    for start in tqdm(batches, desc="predict", unit="batch", disable=not show_progress or len(batches) < 2):
        rows = order[start:start + batch_size]
        output = generator.generate([prompts_ids[i] for i in rows], generation_config, on_step=printer)
        for row, sequence, stopped in zip(rows, output.sequences, output.stopped):
            replies[row] = tokenizer.decode(sequence[:-1] if stopped else sequence)
            stopped_count += int(stopped)
        for key in totals:
            totals[key] += getattr(output, key)
    if printer is not None:
        printer.finish()
    elapsed = time.perf_counter() - start_time

    predictions = []
    for record, prompt, reply in zip(records, prompts_text, replies):
        entry = {"prompt": prompt, "predict": reply}
        if record.label is not None:
            entry["label"] = record.label
        predictions.append(entry)

    metrics = {
        "num_prompts": len(records),
        "num_stopped": stopped_count,
        "num_hit_max_new_tokens": len(records) - stopped_count,
        "template": template.name if template_name != "hf" else "hf",
        "prefill_tokens": totals["prefill_tokens"],
        # Rates leave out the calls that compiled a graph (see GenerationOutput).
        "prefill_tokens_per_second": rate(totals["timed_prefill_tokens"], totals["prefill_seconds"]),
        "decode_tokens": totals["decode_tokens"],
        "decode_tokens_per_second": rate(totals["decode_tokens"], totals["decode_seconds"]),
        "compile_seconds": totals["compile_seconds"],
        "runtime_seconds": elapsed,
    }
    labelled = [(r, p) for r, p in zip(records, predictions) if r.label is not None]
    metrics["num_labelled"] = len(labelled)
    if labelled:
        metrics.update(similarity_scores([p["predict"] for _, p in labelled], [r.label for r, _ in labelled]))
        if compute_loss:
            loss_sum, count = teacher_forced_loss(model, tokenizer, template, [r for r, _ in labelled], batch_size)
            loss = loss_sum / max(count, 1.0)
            metrics.update({"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                            "eval_tokens": int(count)})

    if output_dir is not None:
        write_predict_outputs(output_dir, predictions, metrics)
    return {"predictions": predictions, "metrics": metrics}


def rate(tokens, seconds):
    return tokens / seconds if seconds > 0 else 0.0


def write_predict_outputs(output_dir, predictions, metrics):
    """generated_predictions.jsonl and predict_results.json, each written whole or not at all."""
    os.makedirs(output_dir, exist_ok=True)
    with atomic_output(os.path.join(output_dir, PREDICTIONS_FILE)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for entry in predictions:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    with atomic_output(os.path.join(output_dir, RESULTS_FILE)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2, ensure_ascii=False)


# A checkpoint with no training record is taken for a base model: it continues text, it was
# never taught a chat template.
BASE_MODEL_TEMPLATE = "raw"


def resolve_template(config):
    """(template, where it came from): --template / YAML, else the training run's run_summary.json
    beside the checkpoint, else the train dataset's manifest, else `raw` (a base model)."""
    if config.template:
        return config.template, "config"
    if config.load_checkpoint:
        folder = os.path.abspath(config.load_checkpoint)
        folder = folder if os.path.isdir(folder) else os.path.dirname(folder)
        for _ in range(3):
            summary_path = os.path.join(folder, "run_summary.json")
            if os.path.isfile(summary_path):
                template = read_json(summary_path, ConfigError, "run_summary.json", expect=dict).get("template")
                if template:
                    return template, summary_path
            folder = os.path.dirname(folder)
    template, source = recorded_template(config.train_dataset.data_loader.dataset_dir)
    if template:
        return template, source
    return BASE_MODEL_TEMPLATE, None


def recorded_tokenizer_config(config, template_name):
    """For template hf: the tokenizer_config.json llama_preprocess rendered the training data with
    (None: the tokenizer's own, beside its tokenizer.json)."""
    dataset_dir = config.train_dataset.data_loader.dataset_dir
    if template_name != "hf" or not dataset_dir:
        return None
    path = (dataset_manifest(dataset_dir) or {}).get("tokenizer_config")
    return path if path and os.path.isfile(path) else None


def run(config):
    """run_mode predict from a run config: build the model, load `load_checkpoint`, answer
    `predict_data` in the training template, write the outputs to `output_dir`."""
    if config.predict_data is None:
        raise ConfigError("run_mode predict needs --predict_data (a prompt, a .txt or a .json/.jsonl file)")
    if not (config.load_checkpoint or config.pretrained_model_dir):
        raise ConfigError("run_mode predict needs --load_checkpoint (the trained or converted .ckpt)")
    tokenizer_file = config.processor.tokenizer.vocab_file
    if not tokenizer_file and config.pretrained_model_dir:
        tokenizer_file = config.pretrained_model_dir  # its tokenizer.model, else its tokenizer.json
    if not tokenizer_file:
        raise ConfigError("run_mode predict needs the tokenizer: set processor.tokenizer.vocab_file "
                          "(--processor.tokenizer.vocab_file PATH/tokenizer.model, PATH/tokenizer.json or an "
                          "HF model folder)")
    tokenizer = load_tokenizer(tokenizer_file, config.processor.tokenizer.merges_file)
    template_name, source = resolve_template(config)
    if source is None:
        print(f"template: {template_name} (no training record beside {config.load_checkpoint}: a base model "
              "continues the prompt as plain text; --template NAME asks in a chat template)")
    else:
        print(f"template: {template_name} (from {source})")
    # Generation compiles its own steps with ms.jit; only an accelerator needs selecting.
    if config.context.device_target != "CPU":
        ms.set_device(config.context.device_target)
    ms.set_seed(config.seed)
    model = build_model(config)
    load_start_weights(model, config)
    result = run_predict(model, tokenizer, config.predict_data, config.generation_config, template_name,
                         output_dir=config.output_dir,
                         tokenizer_config_path=recorded_tokenizer_config(config, template_name))
    print(f"{speed_summary(result['metrics'])}; predictions: {os.path.join(config.output_dir, PREDICTIONS_FILE)}")
    return result


def speed_summary(metrics):
    """Decode and prefill tokens/s, compilation left out and said so."""
    def figure(name):
        value = metrics[f"{name}_tokens_per_second"]
        return f"{name} {value:.1f} tokens/s" if value > 0 else f"{name}: every call compiled, no timing"
    return (f"{figure('decode')}, {figure('prefill')} "
            f"(not counting {metrics['compile_seconds']:.1f} s of graph compilation)")
