"""What the command lines share: a --help that lists every flag with its default."""
import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's line breaks and ends each flag's help with its default
    (or "required"); `none_default` says what an unset flag means."""

    none_default = "none"

    def _get_help_string(self, action):
        text = action.help or ""
        # A help that explains its own default (what an unset flag does) keeps its words.
        if not action.option_strings or action.default is argparse.SUPPRESS or "(default" in text:
            return text
        if action.required:
            return f"{text} (required)".strip()
        default = self.none_default if action.default is None else "%(default)s"
        return f"{text} (default: {default})".strip()


class YamlOverrideHelpFormatter(HelpFormatter):
    """For flags that override a YAML key: left out, the YAML's value stands."""

    none_default = "the YAML's value"
