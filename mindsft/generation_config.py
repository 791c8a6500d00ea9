"""What to generate: HuggingFace's `generation_config.json` settings, typed and validated when the
run config is loaded (a typo fails before any work, not after training). Pure Python.
"""
import dataclasses
from typing import List, Optional, Union

from mindsft.errors import ConfigError
from mindsft.input_files import read_json
from mindsft.typed import build

# Keys HuggingFace writes into generation_config.json that do not change what is generated here.
HF_IGNORED_KEYS = frozenset({
    "transformers_version", "_from_model_config", "output_scores", "output_logits",
    "return_dict_in_generate", "output_attentions", "output_hidden_states", "num_return_sequences",
    "cache_implementation", "decoder_start_token_id", "low_memory", "renormalize_logits",
})
# MindFormers' model_config spelling of the same settings.
MINDFORMERS_RENAMES = {"max_decode_length": "max_length"}
# The command lines' flags for the sampling settings (predict, chat, serve): flag -> run config key.
SAMPLING_FLAGS = {name: f"generation_config.{name}"
                  for name in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p")}


def add_sampling_arguments(parser):
    """The flags of SAMPLING_FLAGS on an argparse parser (strings, typed when the config loads)."""
    parser.add_argument("--max_new_tokens", help="generation_config.max_new_tokens")
    parser.add_argument("--do_sample", help="generation_config.do_sample (False: greedy)")
    parser.add_argument("--temperature", help="generation_config.temperature")
    parser.add_argument("--top_k", help="generation_config.top_k")
    parser.add_argument("--top_p", help="generation_config.top_p")


@dataclasses.dataclass
class GenerationConfig:
    """What to generate; field names are those of HuggingFace's `generation_config.json`."""
    max_new_tokens: Optional[int] = None
    max_length: Optional[int] = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: Optional[Union[int, List[int]]] = None
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    # Not in HuggingFace: extra ids that end a reply (e.g. a template's turn separator), and the
    # seed of the sampler so that a sampled run can be repeated.
    stop_token_ids: List[int] = dataclasses.field(default_factory=list)
    seed: Optional[int] = None
    num_beams: int = 1
    # Beam search only: a finished beam's score is its summed log-probability / length**length_penalty;
    # early_stopping True | False | "never" as in transformers.
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    use_cache: bool = True

    DEFAULT_MAX_NEW_TOKENS = 128

    def __post_init__(self):
        self.validate()

    def validate(self):
        if isinstance(self.early_stopping, str) and self.early_stopping.lower() in ("true", "false"):
            self.early_stopping = self.early_stopping.lower() == "true"
        if self.early_stopping not in (True, False, "never"):
            raise ConfigError(f"generation_config: early_stopping {self.early_stopping!r} must be True, False or 'never'")
        if int(self.num_beams) < 1:
            raise ConfigError(f"generation_config: num_beams {self.num_beams} must be >= 1")
        if int(self.num_beams) > 1 and self.do_sample:
            raise ConfigError(f"generation_config: num_beams {self.num_beams} with do_sample: beam sampling "
                              "is not supported (set do_sample False for beam search, or num_beams 1)")
        if self.max_new_tokens is not None and int(self.max_new_tokens) < 1:
            raise ConfigError(f"generation_config: max_new_tokens {self.max_new_tokens} must be >= 1")
        if self.do_sample and not float(self.temperature) > 0:
            raise ConfigError(f"generation_config: temperature {self.temperature} must be > 0 when sampling")
        if not 0 < float(self.top_p) <= 1:
            raise ConfigError(f"generation_config: top_p {self.top_p} must be in (0, 1]")
        if int(self.top_k) < 0:
            raise ConfigError(f"generation_config: top_k {self.top_k} must be >= 0 (0 = off)")
        if not float(self.repetition_penalty) > 0:
            raise ConfigError(f"generation_config: repetition_penalty {self.repetition_penalty} must be > 0")

    @classmethod
    def from_mapping(cls, mapping, source="generation_config"):
        """Build from a mapping (YAML `generation_config` section or HF file). Unknown keys are errors."""
        mapping = dict(mapping or {})
        if isinstance(mapping.get("stop_token_ids"), int):
            mapping["stop_token_ids"] = [mapping["stop_token_ids"]]
        return build(cls, mapping, source, renames=MINDFORMERS_RENAMES, ignored=HF_IGNORED_KEYS)

    @classmethod
    def from_json_file(cls, path):
        """Read a HuggingFace `generation_config.json`."""
        mapping = read_json(path, ConfigError, "generation_config.json", expect=dict)
        return cls.from_mapping(mapping, source=str(path))

    def updated(self, **overrides):
        """A copy with the given fields replaced (None values leave a field as it is)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def stop_ids(self, model_config=None):
        """Every id that ends a row: eos_token_id (one or a list) and stop_token_ids."""
        eos = self.eos_token_id
        if eos is None and model_config is not None:
            eos = model_config.eos_token_id
        ids = set() if eos is None else set(eos if isinstance(eos, (list, tuple)) else [eos])
        return ids | set(int(i) for i in self.stop_token_ids)

    def new_token_budget(self, longest_prompt):
        if self.max_new_tokens is not None:
            return int(self.max_new_tokens)
        if self.max_length is not None:
            budget = int(self.max_length) - longest_prompt
            if budget < 1:
                raise ConfigError(f"generation_config: max_length {self.max_length} leaves no room after "
                                  f"a prompt of {longest_prompt} tokens (set max_new_tokens)")
            return budget
        return self.DEFAULT_MAX_NEW_TOKENS
