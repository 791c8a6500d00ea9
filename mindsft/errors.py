"""The project's exception types: one place, so callers can catch by kind.

Every message names the file, record or tensor at fault and, where it helps, what to do.
One type per kind of input: run YAML and model settings (ConfigError), weight files
(ConvertError; a damaged `.ckpt` is a CheckpointError), datasets and their records (DataError),
tokenizers (TokenizerError), LoRA adapters (AdapterError), output paths (OutputError).
"""
import sys


class MindsftError(Exception):
    """Base of every error mindsft raises on purpose."""


class ConfigError(MindsftError):
    """A YAML key, command-line override or model setting is wrong."""


class ConvertError(MindsftError):
    """A weight file cannot be converted (missing, truncated, unknown tensor, wrong shape)."""


class CheckpointError(ConvertError):
    """A `.ckpt` file is damaged: its checksum fails, or it is truncated or malformed."""


class DataError(MindsftError):
    """An input record or dataset file is malformed."""


class TokenizerError(MindsftError):
    """The tokenizer file is missing or unreadable."""


class AdapterError(ConfigError):
    """A LoRA adapter (adapter_config.json, adapter weights) is malformed."""


class OutputError(MindsftError):
    """An output path holds something the command was not asked to replace."""


def user_errors():
    """The exception types a command line reports as one line: the project's own, and parse
    errors of YAML/JSON that escaped a reader. Anything else is a bug and keeps its traceback."""
    import json
    import yaml
    return (MindsftError, yaml.YAMLError, json.JSONDecodeError)


def report(exc, program=None):
    """Print `exc` as one line on stderr (messages from parsers span several lines)."""
    message = " ".join(str(exc).split())
    print(f"{program + ': ' if program else ''}error: {message}", file=sys.stderr)
