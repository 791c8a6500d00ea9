"""Typed settings from loose mappings: the one builder of dataclasses from YAML/JSON/command-line
values, used by the run config and by every section of it (model, LoRA, generation).

Values are coerced to each field's annotation (`"1e-6"` to a float: YAML 1.1 reads an exponent
without a dot as a string), and an unknown key is an error naming the nearest known one.
"""
import dataclasses
import difflib
import typing
from typing import Any, Dict, List, Union

from mindsft.errors import ConfigError


def nearest_hint(key, choices):
    """' (did you mean 'x'?)' for the closest of `choices`, or '' when none is close."""
    near = difflib.get_close_matches(str(key), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean {near[0]!r}?)" if near else ""


def unknown_key(where, key, choices):
    """The error for a key no section knows."""
    place = f" ({where}.{key})" if where else ""
    return ConfigError(f"unknown key {str(key)!r}{place}{nearest_hint(key, choices)}")


def unwrap_optional(tp):
    """The non-None members of an Optional/Union type annotation."""
    if typing.get_origin(tp) is Union:
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


def coerce(value, tp, where):
    """Convert a YAML or command-line value to the annotated type, or say which key is wrong."""
    if value is None or tp is Any:
        return value
    members = unwrap_optional(tp)
    if len(members) > 1:
        # Union[dataclass, float] (scale_sense) or Union[bool, str] (resume_training).
        for member in members:
            if dataclasses.is_dataclass(member) and isinstance(value, dict):
                return build(member, value, where)
        for member in members:
            try:
                return coerce(value, member, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a valid value")
    tp = members[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (list, List, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = (typing.get_args(tp) or (Any,))[0]   # List[X] and Tuple[X, ...]
        value = [coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(value) if origin is tuple else list(value)
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where}: expected True or False, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")) or number != int(number):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)     # also "1e-5", which YAML 1.1 reads as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def build(cls, mapping, where, renames=None, ignored=()):
    """Instantiate dataclass `cls` from a mapping: values coerced, unknown keys named.

    `renames` maps other spellings (MindFormers', HuggingFace's) to field names; keys in
    `ignored` are accepted and dropped (the caller reports them, see config.no_effect_settings).
    """
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {mapping!r}")
    renames = renames or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in mapping.items():
        name = renames.get(key, key)
        if name in fields:
            path = f"{where}.{key}" if where else str(key)
            kwargs[name] = coerce(value, hints[name], path)
        elif key not in ignored:
            raise unknown_key(where, key, sorted(fields | set(renames) | set(ignored)))
    return cls(**kwargs)
