"""``--config FILE``: every command's options from a JSON or TOML file.

Keys are the flag names (``batch-size`` or ``batch_size``); flags given on the
command line win over the file. Unknown keys are errors naming the key and file.
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from collections.abc import Sequence
from typing import Any

from cache.errors import Stage1Error


def load_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise Stage1Error(f"{path}: config file not found; check --config")
    try:
        if path.endswith(".toml"):
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        else:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
    except json.JSONDecodeError as e:
        raise Stage1Error(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except tomllib.TOMLDecodeError as e:
        raise Stage1Error(f"{path}: invalid TOML: {e}") from None
    if not isinstance(data, dict):
        raise Stage1Error(f"{path}: a config file holds one object of option: value pairs")
    # A saved resolved config ({"config": {...}, ...}) can be fed back as it is.
    if "config" in data and isinstance(data["config"], dict) and "command" in data:
        data = data["config"]
    return data


def apply_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                 args: argparse.Namespace) -> argparse.Namespace:
    """Re-parse ``argv`` with defaults taken from ``args.config`` (flags still win)."""
    path = getattr(args, "config", None)
    if not path:
        return args
    sub: argparse.ArgumentParser = args._parser
    values = load_config_file(path)
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config", "_parser", "_handler")}
    defaults = {}
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in actions:
            raise Stage1Error(f"{path}: unknown key {key!r} for `stage1 {sub.prog.split(' ', 1)[-1]}`; "
                              f"valid keys: {', '.join(sorted(k.replace('_', '-') for k in actions))}")
        action = actions[dest]
        if action.nargs in ("*", "+") or isinstance(action, argparse._AppendAction):
            value = value if isinstance(value, list) else [value]
            if action.type is not None:
                value = [action.type(v) if isinstance(v, str) else v for v in value]
        elif action.type is not None and isinstance(value, str):
            value = action.type(value)
        if action.choices is not None and value not in action.choices and not isinstance(value, list):
            raise Stage1Error(f"{path}: {key} = {value!r} is not one of {sorted(action.choices)}")
        defaults[dest] = value
    sub.set_defaults(**defaults)
    # Appending flags must not add to the file's list: the command line replaces it.
    for dest, action in actions.items():
        if dest in defaults and isinstance(action, argparse._AppendAction):
            action.default = None
    new = parser.parse_args(argv)
    for dest, action in actions.items():
        if dest in defaults and isinstance(action, argparse._AppendAction) and getattr(new, dest) is None:
            setattr(new, dest, defaults[dest])
    return new
