"""LoRA's settings and the adapter naming shared by the layers (`mindsft/lora.py`) and the adapter
files (`mindsft/convert/peft.py`). Pure Python and numpy: the run config builds it when loaded.

Adapter parameters carry MindFormers' names (`<module>.mindpet_delta_lora_a` [rank, in] and
`<module>.mindpet_delta_lora_b` [out, rank]) so our adapter checkpoints read like MindFormers'.
"""
import dataclasses
import math
import re

import numpy as np

from mindsft.errors import ConfigError
from mindsft.models.families import FAMILIES
from mindsft.typed import coerce, unknown_key

LORA_A = "mindpet_delta_lora_a"
LORA_B = "mindpet_delta_lora_b"


@dataclasses.dataclass
class LoraConfig:
    """What to adapt and how: rank, alpha (scaling = alpha / rank), dropout on the adapter input.

    `target_modules` is MindFormers' regex: a linear cell of the decoder is adapted when the
    regex matches its own name from the start (`re.match('.*wq|.*wv', 'wq')`), as MindFormers'
    LoRA adapter does; a cell anywhere (lm_head included) is also adapted when the regex matches
    its full dotted name exactly, which is how adapters of one layer only are named.
    """
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = ".*wq|.*wv"
    exclude_layers: tuple = ()
    use_rslora: bool = False

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"lora_rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.dropout!r}")
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)
        if isinstance(self.exclude_layers, str):
            self.exclude_layers = (self.exclude_layers,)
        self.exclude_layers = tuple(self.exclude_layers or ())
        for rule in (self.target_modules, *self.exclude_layers):
            try:
                re.compile(rule)
            except (re.error, TypeError) as exc:
                raise ConfigError(f"LoRA target/exclude regex {rule!r} does not compile: {exc}") from None

    @property
    def scaling(self):
        """The factor on B·A: alpha / rank, or alpha / sqrt(rank) with rank-stabilised LoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    # MindFormers' pet_config keys that change nothing in what is computed here.
    MINDFORMERS_IGNORED_KEYS = frozenset({"pet_type", "lora_a_init", "lora_b_init", "param_init_type",
                                          "compute_dtype", "freeze_include", "freeze_exclude"})

    @classmethod
    def from_mindformers(cls, pet_config):
        """Build from MindFormers' `model.model_config.pet_config` mapping (pet_type lora)."""
        if not isinstance(pet_config, dict):
            raise ConfigError(f"pet_config must be a mapping of LoRA settings, got {pet_config!r}")
        pet_config = dict(pet_config)
        pet_type = str(pet_config.get("pet_type", "lora")).lower()
        if pet_type != "lora":
            raise ConfigError(f"pet_config: pet_type {pet_config.get('pet_type')!r} is not supported (lora only)")
        for key in ("freeze_include", "freeze_exclude"):
            if pet_config.get(key):
                raise ConfigError(f"pet_config: {key} is not supported: only the LoRA weights are trained")
        known = {"lora_rank": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout",
                 "target_modules": "target_modules", "exclude_layers": "exclude_layers",
                 "use_rslora": "use_rslora"}
        kwargs = {}
        for key, value in pet_config.items():
            if key in known:
                if value is not None:
                    kwargs[known[key]] = value
            elif key not in cls.MINDFORMERS_IGNORED_KEYS:
                raise unknown_key("pet_config", key, sorted(set(known) | cls.MINDFORMERS_IGNORED_KEYS))
        return cls(**kwargs)

    @classmethod
    def from_llamafactory(cls, args, family=None):
        """Build from LLaMA-Factory's spellings: finetuning_type lora, lora_rank, lora_alpha
        (default 2·rank, as LLaMA-Factory), lora_dropout, lora_target ('q_proj,v_proj' or 'all',
        as PEFT names the projections of the model's `family`)."""
        args = dict(args)
        if str(args.get("finetuning_type", "lora")).lower() != "lora":
            raise ConfigError(f"finetuning_type {args['finetuning_type']!r} is not lora")
        for key in ("use_dora", "additional_target", "pissa_init", "loraplus_lr_ratio"):
            if args.get(key):
                raise ConfigError(f"{key} is not supported by mindsft's LoRA")
        rank = coerce(args.get("lora_rank", 8), int, "lora_rank")
        alpha = args.get("lora_alpha")
        return cls(rank=rank, alpha=float(alpha) if alpha is not None else 2.0 * rank,
                   dropout=float(args.get("lora_dropout", 0.0)),
                   target_modules=target_regex_from_hf_names(args.get("lora_target", "all"), family),
                   use_rslora=bool(args.get("use_rslora", False)))


def target_regex_from_hf_names(names, family=None):
    """MindFormers regex for PEFT's projection names of `family` ('q_proj,v_proj', a list, or 'all')."""
    projections = (family or FAMILIES["llama"]).lora_projections
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    if names == ["all"]:
        # LLaMA-Factory's `all`: every linear layer of the decoder, never the output head.
        names = list(projections)
    unknown = [n for n in names if n not in projections]
    if unknown or not names:
        raise ConfigError(f"lora_target {unknown or names!r}: known projections are "
                          f"{', '.join(projections)} or 'all'")
    return "|".join(".*" + cell for n in names for cell in projections[n])


def is_adapter_name(name):
    return name.endswith("." + LORA_A) or name.endswith("." + LORA_B)


def merged_weight(weight, lora_a, lora_b, scaling):
    """W + scaling · B·A, computed in float32 and returned in W's dtype."""
    delta = np.asarray(lora_b, np.float32) @ np.asarray(lora_a, np.float32)
    return (np.asarray(weight, np.float32) + np.float32(scaling) * delta).astype(np.asarray(weight).dtype)
