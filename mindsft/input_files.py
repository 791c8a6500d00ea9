"""Reading the JSON and YAML files a user hands us, so that every way they can be wrong
(missing, a folder, not UTF-8, truncated, nested past Python's recursion limit, the wrong
top-level type) ends in one line naming the file, raised as the caller's kind of error."""
import json
import os


def read_text(path, error, what="file"):
    """The UTF-8 text of `path`; `error` is the MindsftError subclass to raise."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise error(f"{path}: is a folder, expected a {what}")
    if not os.path.isfile(path):
        raise error(f"{path}: {what} not found")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}); expected a {what}") from None


def parse_json(text, path, error, what="JSON file"):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        detail = "empty" if not text.strip() else f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        raise error(f"{path}: {detail} (expected a {what})") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to read (expected a {what})") from None


def read_json(path, error, what="JSON file", expect=None):
    """Parse a JSON file; `expect` (dict or list) is the required top-level type."""
    value = parse_json(read_text(path, error, what), os.fspath(path), error, what)
    if expect is not None and not isinstance(value, expect):
        kind = "an object" if expect is dict else "an array" if expect is list else expect.__name__
        raise error(f"{os.fspath(path)}: the top level must be {kind}, got {type(value).__name__} "
                    f"(expected a {what})")
    return value


def read_yaml(path, error, what="YAML file"):
    """Parse a YAML file whose top level is a mapping."""
    import yaml
    text = read_text(path, error, what)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{os.fspath(path)}: not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise error(f"{os.fspath(path)}: YAML nested too deeply to read") from None
    if not isinstance(value, dict):
        raise error(f"{os.fspath(path)}: the top level must be a mapping of keys (expected a {what})")
    return value


def field(mapping, key, types, source, error, required=True, default=None):
    """mapping[key], checked to be one of `types` (bool is not accepted as a number)."""
    if key not in mapping or mapping[key] is None:
        if required:
            raise error(f"{source}: missing key {key!r}")
        return default
    value = mapping[key]
    types = types if isinstance(types, tuple) else (types,)
    numeric = any(t in (int, float) for t in types)
    if not isinstance(value, types) or (numeric and isinstance(value, bool) and bool not in types):
        names = " or ".join("number" if t is float else "integer" if t is int else "string" if t is str
                            else "list" if t is list else "object" if t is dict else t.__name__ for t in types)
        article = "an" if names[0] in "aeiou" else "a"
        raise error(f"{source}: {key} must be {article} {names}, got {value!r:.60}")
    return value
