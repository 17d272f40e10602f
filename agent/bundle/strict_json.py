"""Parse manifest JSON refusing duplicate keys at any depth.

Python's json keeps the last of two equal keys. A signed manifest with `"version": 3` and
`"version": 9` would then mean whatever the reader's parser picks, so two readers could see two
models under one signature; a duplicate is refused instead, naming the key and where it is.
"""

from __future__ import annotations

import json
from typing import Any


class DuplicateKey(ValueError):
    """A JSON object has the same key twice."""

    def __init__(self, key: str, where: str) -> None:
        self.key = key
        self.where = where
        super().__init__(f"key {key!r} appears twice in {where}")


class _Pairs(list[tuple[str, Any]]):
    """An object's members in document order, duplicates kept, until it is checked."""


def _where(path: list[str]) -> str:
    return "the top-level object" if not path else "object " + ".".join(path)


def _check(value: Any, path: list[str]) -> Any:
    """Turn _Pairs into dicts, depth first, raising on the first duplicate in document order."""
    if isinstance(value, _Pairs):
        out: dict[str, Any] = {}
        for key, item in value:
            if key in out:
                raise DuplicateKey(key, _where(path))
            out[key] = _check(item, [*path, key])
        return out
    if isinstance(value, list):
        return [_check(item, [*path, str(i)]) for i, item in enumerate(value)]
    return value


def loads_unique(data: bytes | str) -> Any:
    """json.loads, but an object with a repeated key raises DuplicateKey naming it."""
    # The hook keeps every pair; checking after the parse gives the duplicate's full path.
    return _check(json.loads(data, object_pairs_hook=_Pairs), [])
