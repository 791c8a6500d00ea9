"""The project's exception types: one place, so callers can catch by kind.

Every message names the file, record or tensor at fault and, where it helps, what to do.
"""


class MindsftError(Exception):
    """Base of every error mindsft raises on purpose."""


class ConfigError(MindsftError):
    """A YAML key, command-line override or model setting is wrong."""


class ConvertError(MindsftError):
    """A weight file cannot be converted (missing, truncated, unknown tensor, wrong shape)."""


class DataError(MindsftError):
    """An input record or dataset file is malformed."""


class TokenizerError(MindsftError):
    """The tokenizer file is missing or unreadable."""
