"""The chat tab's model: a board training run (its base, with its LoRA adapters or its final
weights) or any checkpoint / HF folder, loaded as run_mode predict loads one, asked in the
template its training recorded, answering greedily (or as the page asks) with predict's
KV-cache generation, each reply streamed as its tokens arrive."""
import os
import queue
import threading

from mindsft.board.forms import TRAIN_YAML, model_family, model_source, path_of
from mindsft.errors import ConfigError


def final_weights(run_dir, config):
    """The final checkpoint a board run wrote: its adapters for LoRA, else its full weights."""
    prefix = config.callbacks.checkpoint.prefix if config.callbacks.checkpoint else "llama"
    name = f"{prefix}_final_lora.ckpt" if config.lora is not None else f"{prefix}_final.ckpt"
    path = os.path.join(run_dir, "checkpoint", name)
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir}: no {os.path.join('checkpoint', name)} yet (has the run finished?)")
    return path


def chat_config(source, tokenizer_path=None):
    """(run config for predict, final weights to load on top or None) for a run folder or a model."""
    from mindsft.config import build_run_config, load_run_config
    source = path_of(source)
    yaml_path = os.path.join(source, TRAIN_YAML)
    if os.path.isfile(yaml_path):
        overrides = {"run_mode": "predict", "use_parallel": "False"}
        if tokenizer_path:
            overrides["processor.tokenizer.vocab_file"] = path_of(tokenizer_path)
        config = load_run_config(yaml_path, overrides)
        return config, final_weights(source, config)
    source_key, model_path = model_source(source)
    family = model_family(model_path)[0]
    raw = {"run_mode": "predict", source_key: model_path,
           "model": {"arch": {"type": family.arch_types[0] if family else "LlamaForCausalLM"}, "model_config": {}},
           "processor": {"tokenizer": {"vocab_file": path_of(tokenizer_path) or
                                       (model_path if source_key == "pretrained_model_dir" else None)}}}
    return build_run_config(raw), None


class ChatModel:
    """One loaded model; `stream` yields a reply's text pieces. One reply at a time."""

    def __init__(self, source, tokenizer_path=None, template=None):
        import mindspore as ms
        from mindsft.models.build import assign_weights, build_model, load_start_weights, model_weights
        from mindsft.train.checkpoint import load_checkpoint_arrays
        from mindsft.predict import recorded_tokenizer_config, resolve_template
        from mindsft.templates import get_template
        from mindsft.tokenizer import load_tokenizer
        config, final = chat_config(source, tokenizer_path)
        if not config.processor.tokenizer.vocab_file:
            raise ConfigError(f"{source}: give the tokenizer (a tokenizer.model, tokenizer.json or HF folder)")
        self.tokenizer = load_tokenizer(config.processor.tokenizer.vocab_file)
        if template:
            self.template_name, self.template_source = template, "the page"
        else:
            # A run's template is in its run_summary.json, beside the final weights' folder.
            probe = config if final is None else _with_checkpoint(config, final)
            self.template_name, self.template_source = resolve_template(probe)
        self.template = get_template(self.template_name, recorded_tokenizer_config(config, self.template_name),
                                     self.tokenizer)
        ms.set_seed(config.seed)
        self.model = build_model(config)
        load_start_weights(self.model, config)
        if final is not None:
            # Over the base: the run's adapters (LoRA) or all its weights.
            assign_weights(self.model, model_weights(load_checkpoint_arrays(final)), source=final, strict=False)
        self.config, self.source = config, path_of(source)
        self.lock = threading.Lock()

    def describe(self):
        return {"source": self.source, "template": self.template_name,
                "template_source": str(self.template_source or "none: a base model continues text"),
                "family": self.config.model_config.family}

    def prompt_ids(self, messages):
        return self.template.encode_prompt(self.tokenizer, messages)

    def stream(self, messages, max_new_tokens=64, do_sample=False, temperature=1.0):
        """The reply's text, piece by piece, as generation goes."""
        from mindsft.generate import Generator
        from mindsft.predict import StreamPrinter, generation_settings
        settings = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample)}
        if do_sample:
            settings["temperature"] = float(temperature)
        generation_config = generation_settings(settings, self.tokenizer, self.template)
        ids = self.prompt_ids(messages)
        pieces = queue.Queue()
        done = object()

        class QueueStream:
            def write(self, text):
                pieces.put(text)

            def flush(self):
                pass

        def generate():
            try:
                with self.lock:
                    printer = StreamPrinter(self.tokenizer, generation_config.stop_ids(self.model.config),
                                            QueueStream())
                    Generator(self.model).generate([ids], generation_config, on_step=printer)
            except Exception as exc:  # the page shows it; the board keeps serving
                pieces.put(ChatFailure(" ".join(str(exc).split())))
            pieces.put(done)

        threading.Thread(target=generate, daemon=True).start()
        while True:
            piece = pieces.get()
            if piece is done:
                return
            if isinstance(piece, ChatFailure):
                raise piece
            yield piece


class ChatFailure(Exception):
    """Generation failed inside the chat's thread."""


def _with_checkpoint(config, final):
    import copy
    probe = copy.copy(config)
    probe.load_checkpoint = final
    return probe
