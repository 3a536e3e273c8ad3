"""Bounded reading of JSON and YAML: anything a file can hold becomes a value or one
TwostageError naming the file, with memory bounded by the file's size (YAML aliases included)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import TwostageError

MAX_TREE_VALUES = 1_000_000
"""A YAML file may expand to at most this many values: aliases let a file of a few hundred
bytes stand for billions of them ("billion laughs"); JSON cannot, its size bounds it."""


def _parse_error(path: str | os.PathLike, language: str, what: str, e: Exception) -> TwostageError:
    if isinstance(e, RecursionError):
        return TwostageError(f"{path}: {language} of {what} nested too deeply")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return TwostageError(f"{path}: invalid {language} in {what} ({first})")


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise TwostageError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise TwostageError(f"{path}: invalid {what} (not UTF-8 text: {e.reason} at byte {e.start})") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file; unreadable, invalid or too deeply nested files are one-line errors naming it.
    (NaN and Infinity are accepted as Python reads them; callers check their numbers.)"""
    path = Path(path)
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, and Python's int digit limit
        raise _parse_error(path, "JSON", what, e) from None


def _check_tree_size(obj: Any, path: str | os.PathLike, what: str) -> None:
    """Count the values `obj` expands to (without recursion: a deep tree is no problem here),
    stopping at MAX_TREE_VALUES."""
    stack, count = [obj], 0
    while stack:
        v = stack.pop()
        count += 1
        if count > MAX_TREE_VALUES:
            raise TwostageError(f"{path}: {what} expands to more than {MAX_TREE_VALUES} values "
                                "(YAML aliases repeating one another?)")
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set)):
            stack.extend(v)


def parse_yaml(text: str, where: str | os.PathLike, what: str = "YAML") -> Any:
    """`yaml.safe_load(text)`; anything it cannot turn into values (also dates that do not
    exist, numbers of too many digits, nesting too deep, aliases expanding beyond
    MAX_TREE_VALUES) is one TwostageError naming `where` (the file, or the flag)."""
    import yaml

    try:
        obj = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - besides YAMLError, the constructors raise ValueError,
        # IndexError, OverflowError (`a: !!int`, `a: 2001-02-30`, `a: !!int 08`) and deep nesting RecursionError
        raise _parse_error(where, "YAML", what, e) from None
    _check_tree_size(obj, where, what)
    return obj


def read_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """Parse a YAML file (`parse_yaml`); unreadable or invalid files are one-line errors naming it."""
    path = Path(path)
    return parse_yaml(_read_text(path, what), path, what)
