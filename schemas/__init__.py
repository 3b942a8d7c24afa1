"""JSON Schemas of every artifact stage1 writes, shipped as package data.

Artifacts are validated on write (a bug here must not produce a file others trust)
and on read (a hand-edited or foreign file gives one clear line, not a traceback).
"""

from __future__ import annotations

import json
import os
from functools import cache
from typing import Any

import jsonschema

from cache.errors import Stage1Error

_DIR = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    return sorted(f[: -len(".schema.json")] for f in os.listdir(_DIR) if f.endswith(".schema.json"))


@cache
def load_schema(name: str) -> dict[str, Any]:
    path = os.path.join(_DIR, f"{name}.schema.json")
    with open(path, encoding="utf-8") as fh:
        schema = json.load(fh)
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def validate(obj: Any, name: str, *, where: str) -> None:
    """Raise :class:`Stage1Error` naming ``where`` and the first violation."""
    validator = jsonschema.Draft202012Validator(load_schema(name))
    err = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if err is not None:
        loc = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise Stage1Error(f"{where}: does not match the {name} schema at {loc}: {err.message[:200]}")


def write_json(obj: Any, path: str, name: str) -> None:
    """Validate, then write atomically (temp file + rename) with a trailing newline."""
    validate(obj, name, where=path)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, path)


def read_json(path: str, name: str) -> Any:
    """Read and validate; missing, malformed or non-conforming files raise :class:`Stage1Error`."""
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except FileNotFoundError:
        raise Stage1Error(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise Stage1Error(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    validate(obj, name, where=path)
    return obj
