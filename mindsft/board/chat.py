"""The chat tab's model: a generation session (`mindsft.session`, what tools/chat.py and the
server answer with) on a board training run — its base with the run's PEFT adapter, or its final
weights — or on any checkpoint / HF folder, asked in the template its training recorded."""
import os

from mindsft.board.forms import TRAIN_YAML, model_family, model_source, path_of
from mindsft.config import build_run_config, load_run_config
from mindsft.errors import ConfigError

RUN_ADAPTER = "run"


def final_weights(run_dir, config):
    """The final full weights a board run wrote."""
    prefix = config.callbacks.checkpoint.prefix if config.callbacks.checkpoint else "llama"
    path = os.path.join(run_dir, "checkpoint", f"{prefix}_final.ckpt")
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir}: no {os.path.join('checkpoint', os.path.basename(path))} yet "
                          "(has the run finished?)")
    return path


def chat_config(source, tokenizer_path=None):
    """(run config for the session, {adapter name: PEFT folder}) of a run folder or a model."""
    source = path_of(source)
    overrides = {"run_mode": "predict", "use_parallel": "False"}
    if tokenizer_path:
        overrides["processor.tokenizer.vocab_file"] = path_of(tokenizer_path)
    yaml_path = os.path.join(source, TRAIN_YAML)
    if os.path.isfile(yaml_path):
        trained = load_run_config(yaml_path, overrides)
        if trained.lora is not None:
            adapter = os.path.join(source, "peft_adapter")
            if not os.path.isdir(adapter):
                raise ConfigError(f"{source}: no peft_adapter folder yet (has the run finished?)")
            # The base as it was before training (a QLoRA base in full precision, as merge_lora
            # takes it); the session applies the run's adapter.
            base = load_run_config(yaml_path, {**overrides, "finetuning_type": "full", "quantization_bit": "null"})
            return base, {RUN_ADAPTER: adapter}
        full = load_run_config(yaml_path, {**overrides, "load_checkpoint": final_weights(source, trained),
                                           "pretrained_model_dir": "null"})
        return full, {}
    source_key, model_path = model_source(source)
    family = model_family(model_path)[0]
    raw = {"run_mode": "predict", source_key: model_path,
           "model": {"arch": {"type": family.arch_types[0] if family else "LlamaForCausalLM"}, "model_config": {}}}
    if tokenizer_path:
        raw["processor"] = {"tokenizer": {"vocab_file": path_of(tokenizer_path)}}
    return build_run_config(raw), {}


class ChatModel:
    """One loaded session; `stream` yields a reply's text pieces."""

    def __init__(self, source, tokenizer_path=None, template=None):
        # MindSpore loads with the session: a board that never chats starts without it.
        from mindsft.session import load_session  # deferred: MindSpore
        config, adapters = chat_config(source, tokenizer_path)
        if template:
            config.template = template
        self.notes = []
        self.session = load_session(config, adapters, log=self.notes.append)
        self.adapter = RUN_ADAPTER if adapters else None
        self.source, self.family = path_of(source), config.model_config.family

    def describe(self):
        return {"source": self.source, "template": self.session.template.name or "hf", "family": self.family,
                "loaded": " ".join(self.notes), "adapter": self.adapter}

    def prompt_ids(self, messages):
        return self.session.chat_prompt(messages)

    def stream(self, messages, max_new_tokens=64):
        """The reply's text, piece by piece (greedy)."""
        settings = self.session.settings(max_tokens=int(max_new_tokens), temperature=0)
        return self.session.stream(self.prompt_ids(messages), settings, adapter=self.adapter)

    def close(self):
        self.session.close()
