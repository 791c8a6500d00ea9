"""A model loaded to talk with: what chat and the server share.

It loads the model as run_mode predict does (the run config's model, `load_checkpoint` a .ckpt,
a training output or a HuggingFace folder, optional PEFT adapters on top), renders messages in
the model's template (the one its training recorded, else the tokenizer's own chat_template, else
`raw`), stops at the model's end tokens and the template's turn end, and generates through one
continuous-batching decode loop (`mindsft.batching`).
"""
import dataclasses
import os
import queue
from typing import Dict

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from mindsft import lora
from mindsft.batching import ContinuousBatcher, Request
from mindsft.config import load_run_config
from mindsft.convert import peft
from mindsft.errors import ConfigError, DataError
from mindsft.generation_config import SAMPLING_FLAGS, add_sampling_arguments
from mindsft.loading import build_model, load_hf_weights, load_start_weights
from mindsft.lora import adapter_state
from mindsft.lora_config import LORA_B
from mindsft.models.families import family_of
from mindsft.predict import generation_settings, recorded_tokenizer_config, resolve_template
from mindsft.templates import get_template
from mindsft.tokenizer import load_tokenizer

DEFAULT_MODEL_NAME = "mindsft"


class RequestError(DataError):
    """A request that cannot be served as asked (the server answers it with HTTP 400)."""

    def __init__(self, message, param=None, code=None):
        super().__init__(message)
        self.param, self.code = param, code


class ReplyText:
    """The text of a reply as its tokens arrive: decodes all tokens so far (so that
    sentencepiece's word-initial spaces come out right), holds back a partial UTF-8 character
    and any tail that could begin a stop string, and ends at the first stop string (which is
    not part of the text, as OpenAI documents `stop`)."""

    def __init__(self, tokenizer, stop_ids, stop_strings=()):
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.stop_strings = [s for s in stop_strings if s]
        self.tokens, self.sent, self.stopped = [], "", False

    def add(self, token):
        """The new text the token makes safe to show ('' if none); sets `stopped` at a stop string."""
        if self.stopped or token in self.stop_ids:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        cut = min((text.find(s) for s in self.stop_strings if s in text), default=-1)
        if cut >= 0:
            self.stopped = True
            return text[len(self.sent):cut] if cut >= len(self.sent) else ""
        safe = len(text)
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    safe = min(safe, len(text) - size)
                    break
        return self._advance(text[:safe])

    def finish(self):
        """What is left to show when the reply ends (a held-back tail that began no stop string)."""
        if self.stopped:
            return ""
        return self._advance(self.tokenizer.decode(self.tokens))

    def _advance(self, text):
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    @property
    def text(self):
        return self.sent


@dataclasses.dataclass
class Adapters:
    """LoRA adapters served side by side on one base: {name: adapter arrays}; the base is
    served with every B set to zero (x·Aᵀ·0 adds exactly nothing)."""
    model: object
    arrays: Dict[str, dict]

    def switch(self, name):
        """Make adapter `name`'s weights the model's (None: the base)."""
        params = adapter_state(self.model)
        chosen = self.arrays.get(name)
        for param_name, param in params.items():
            if chosen is not None:
                value = chosen[param_name]
            else:
                value = np.zeros(param.shape, np.float32) if LORA_B in param_name else param.asnumpy()
            # In place: a compiled decode step keeps reading the parameter's own buffer.
            ops.assign(param, Tensor(np.asarray(value)).astype(param.dtype))


class GenerationSession:
    """One loaded model and its decode loop. model_name names the base in the API; adapters:
    {name: Adapters arrays} served beside it."""

    def __init__(self, model, tokenizer, template, generation_config=None, context_length=None,
                 model_name=DEFAULT_MODEL_NAME, adapters=None, max_batch=8, prompt_bucket=16):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.generation_config = generation_settings(generation_config, tokenizer, template)
        self.stop_ids = frozenset(self.generation_config.stop_ids(model.config))
        self.context_length = int(context_length or model.config.seq_length)
        self.model_name = model_name
        self.adapters = adapters
        self.raw_template = get_template("raw")
        self.batcher = ContinuousBatcher(
            model, max_batch, self.context_length + prompt_bucket,
            self.generation_config.pad_token_id if self.generation_config.pad_token_id is not None else 0,
            prompt_bucket, switch_adapter=adapters.switch if adapters else None)

    @property
    def model_names(self):
        return [self.model_name] + sorted(self.adapters.arrays) if self.adapters else [self.model_name]

    def adapter_of(self, model_name):
        """The adapter a request's `model` names (None: the base); RequestError if unknown."""
        if model_name == self.model_name:
            return None
        if self.adapters and model_name in self.adapters.arrays:
            return model_name
        raise RequestError(f"model {model_name!r} does not exist; this server has {', '.join(self.model_names)}",
                           param="model", code="model_not_found")

    def chat_prompt(self, messages, system=None):
        """Token ids of a conversation that ends with a user message, ready for the reply."""
        return self.template.encode_prompt(self.tokenizer, messages, system)

    def text_prompt(self, text):
        """Token ids of a raw prompt (what /v1/completions continues)."""
        return self.raw_template.encode_prompt(self.tokenizer, [{"role": "user", "content": text}])

    def settings(self, max_tokens=None, temperature=None, top_p=None, seed=None):
        """The GenerationConfig of a request: generation_config's, with what the request sets
        (temperature 0: greedy; above 0: sampling)."""
        config = self.generation_config
        if temperature is not None:
            config = dataclasses.replace(config, do_sample=temperature > 0,
                                         temperature=temperature if temperature > 0 else 1.0)
        if top_p is not None:
            config = dataclasses.replace(config, top_p=top_p)
        if seed is not None:
            config = dataclasses.replace(config, seed=seed)
        if max_tokens is not None:
            config = dataclasses.replace(config, max_new_tokens=max_tokens)
        config.validate()
        return config

    def token_budget(self, prompt_ids, config, explicit=False):
        """New tokens a prompt may have: the config's, cut to the context (RequestError when the
        prompt leaves no room, or when an explicit max_tokens does not fit)."""
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise RequestError(f"the prompt is {len(prompt_ids)} tokens, the model's context is {self.context_length}; "
                               "shorten it", param="messages", code="context_length_exceeded")
        wanted = config.new_token_budget(len(prompt_ids))
        if explicit and wanted > room:
            raise RequestError(f"this model's context is {self.context_length} tokens: a prompt of "
                               f"{len(prompt_ids)} tokens leaves {room} for max_tokens, not {wanted}",
                               param="max_tokens", code="context_length_exceeded")
        return min(wanted, room)

    def submit(self, prompt_ids, config, sink, adapter=None, max_new_tokens=None):
        """Queue a generation; `sink` receives its events (see batching.Request)."""
        budget = max_new_tokens or self.token_budget(prompt_ids, config)
        return self.batcher.submit(Request(list(prompt_ids), config, budget, self.stop_ids, sink, adapter))

    def stream(self, prompt_ids, config=None, stop_strings=(), adapter=None, max_new_tokens=None):
        """Yield a reply's text pieces as they are generated (blocking; for the chat)."""
        events = queue.Queue()
        request = self.submit(prompt_ids, config or self.generation_config, events.put, adapter, max_new_tokens)
        text = ReplyText(self.tokenizer, self.stop_ids, stop_strings)
        try:
            while True:
                kind, value = events.get()
                if kind == "token":
                    piece = text.add(value)
                    if piece:
                        yield piece
                    if text.stopped:
                        request.cancel()
                        return
                elif kind == "error":
                    raise RuntimeError(value)
                else:
                    piece = text.finish()
                    if piece:
                        yield piece
                    return
        finally:
            request.cancel()

    def close(self):
        self.batcher.stop()


def is_hf_folder(path):
    """A HuggingFace model folder (config.json and weights, no .ckpt)."""
    if not path or not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        return False
    names = os.listdir(path)
    return not any(n.endswith(".ckpt") for n in names) and any(
        n.endswith((".safetensors", ".bin")) for n in names)


def session_template(config, tokenizer):
    """(template name, where it came from): predict's choice, except that a model with no training
    record whose tokenizer has its own chat_template is asked in that (`hf`)."""
    name, source = resolve_template(config)
    if source is None and getattr(tokenizer, "chat_template", None):
        return "hf", "the tokenizer's chat_template"
    return name, source or "no training record: a base model continues the text"


def parse_adapters(specs):
    """{name: PEFT folder} from `NAME=FOLDER` or `FOLDER` (named after the folder)."""
    adapters = {}
    for spec in specs or ():
        name, _, folder = spec.rpartition("=")
        name = name or os.path.basename(os.path.normpath(folder))
        if not os.path.isdir(folder):
            raise ConfigError(f"--adapter {spec}: {folder} is not a folder (a PEFT adapter: adapter_config.json "
                              "and adapter_model.safetensors)")
        if name in adapters:
            raise ConfigError(f"--adapter {spec}: the name {name!r} is given twice")
        adapters[name] = folder
    return adapters


def load_adapters(model, folders):
    """Apply LoRA for the PEFT adapter folders {name: folder} (one LoRA layout for all) and read
    each one's weights; returns Adapters, or None when there are none."""
    if not folders:
        return None
    family = family_of(model.config)
    arrays, layout = {}, None
    for name, folder in folders.items():
        lora_config, weights = peft.read_peft_adapter(folder, family)
        if layout is None:
            layout = lora_config
            lora.apply_lora(model, lora_config)
        elif lora_config != layout:
            raise ConfigError(f"--adapter {name}={folder}: its LoRA settings differ from the first adapter's "
                              f"({lora_config} vs {layout}); adapters served together share rank, alpha and "
                              "target modules: serve this one from its own server")
        names = set(lora.adapter_state(model))
        missing = names - set(weights)
        if missing:
            raise ConfigError(f"{folder}: adapter lacks {', '.join(sorted(missing)[:3])}")
        arrays[name] = {key: np.asarray(weights[key]) for key in names}
    return Adapters(model, arrays)


def load_session(config, adapter_folders=None, model_name=None, max_batch=8, log=print):
    """A GenerationSession from a run config, loaded as run_mode predict loads its model."""
    if not (config.load_checkpoint or config.pretrained_model_dir):
        raise ConfigError("needs --load_checkpoint: a .ckpt, a training output folder or a HuggingFace model folder")
    hf_folder = config.pretrained_model_dir or (config.load_checkpoint if is_hf_folder(config.load_checkpoint)
                                                else None)
    tokenizer_file = config.processor.tokenizer.vocab_file or hf_folder
    if not tokenizer_file:
        raise ConfigError("needs the tokenizer: --processor.tokenizer.vocab_file PATH/tokenizer.model, "
                          "PATH/tokenizer.json or an HF model folder")
    tokenizer = load_tokenizer(tokenizer_file)
    template_name, source = session_template(config, tokenizer)
    log(f"template: {template_name} ({source})")
    if config.context.device_target != "CPU":
        ms.set_device(config.context.device_target)
    ms.set_seed(config.seed)
    model = build_model(config)
    if hf_folder:
        load_hf_weights(model, hf_folder)
    else:
        load_start_weights(model, config)
    adapters = load_adapters(model, adapter_folders)
    template = get_template(template_name, recorded_tokenizer_config(config, template_name), tokenizer)
    name = model_name or DEFAULT_MODEL_NAME
    return GenerationSession(model, tokenizer, template, config.generation_config, model.config.seq_length,
                             name, adapters, max_batch)


def drop_oldest_turns(session, messages, system, reserve):
    """(prompt ids, messages kept, turns dropped): the oldest user/assistant pairs go until the
    prompt leaves `reserve` tokens of the context for the reply."""
    dropped = 0
    while True:
        ids = session.chat_prompt(messages, system)
        if len(ids) + reserve <= session.context_length or len(messages) <= 1:
            return ids, messages, dropped
        messages = messages[2:]
        dropped += 1



# ---- the model flags chat and serve share (as run_mindformer.py --run_mode predict takes them) ----

MODEL_FLAGS = {
    "load_checkpoint": "load_checkpoint", "template": "template", "seed": "seed",
    "device_target": "context.device_target", "vocab_file": "processor.tokenizer.vocab_file",
    "repetition_penalty": "generation_config.repetition_penalty", **SAMPLING_FLAGS,
}
MODEL_FLAGS_EPILOG = ("Any other YAML key can be set with a dotted flag (--generation_config.max_new_tokens 64, "
                      "--processor.tokenizer.vocab_file PATH).")


def add_model_arguments(parser):
    parser.add_argument("--config", required=True, help="run config YAML (the model's settings and tokenizer)")
    parser.add_argument("--load_checkpoint", help="the weights: a .ckpt, a training output folder, or a "
                                                  "HuggingFace model folder")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]FOLDER",
                        help="a PEFT LoRA adapter on the base, served as model NAME (repeatable)")
    parser.add_argument("--model_name", default=DEFAULT_MODEL_NAME, help="the base model's name in the API")
    parser.add_argument("--template", help="prompt template (default: the one training recorded, else the "
                                           "tokenizer's chat_template, else raw)")
    parser.add_argument("--vocab_file", help="processor.tokenizer.vocab_file: tokenizer.model, tokenizer.json "
                                             "or an HF folder (default: the YAML's, else the HF weights folder)")
    add_sampling_arguments(parser)
    parser.add_argument("--repetition_penalty", help="generation_config.repetition_penalty")
    parser.add_argument("--seed", help="seed of sampling")
    parser.add_argument("--device_target", help="CPU, GPU or Ascend")
    parser.add_argument("--max_batch", type=int, default=8, help="sequences decoded together")


def run_config_from_arguments(parser, args, rest):
    """The RunConfig of parsed model flags plus `--dotted.key value` pairs in `rest`."""
    overrides = {key: getattr(args, flag) for flag, key in MODEL_FLAGS.items() if getattr(args, flag) is not None}
    if len(rest) % 2:
        parser.error(f"dotted overrides come in pairs (--a.b value): {' '.join(rest)}")
    for flag, value in zip(rest[::2], rest[1::2]):
        if not flag.startswith("--"):
            parser.error(f"unexpected argument {flag!r}")
        overrides[flag[2:]] = value
    overrides.setdefault("run_mode", "predict")
    return load_run_config(args.config, overrides)
