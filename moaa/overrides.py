"""The one `--set KEY.PATH=VALUE` grammar of every moaa command (pipeline, train, submit).

A value is JSON when it parses as JSON (numbers, true/false/null, "quoted strings", lists, objects) and
a bare string otherwise, so `save_strategy=no` stays the string "no" (YAML 1.1 would read it as false).
Text that starts like a list or object but is not valid JSON is refused rather than kept as a string:
`loss_type=[a, b]` is almost surely meant as a list. `format_set` writes the grammar back (values as
JSON), so argv built from a config parses into the same config.

A leaf module: the trainer, which imports nothing else of moaa but errors, uses it too.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Iterable

from moaa.errors import UserError


def _no_constants(name: str) -> Any:
    raise ValueError(name)  # NaN/Infinity are not JSON: keep them as strings


def parse_value(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_no_constants)
    except ValueError:
        pass
    if text.lstrip()[:1] in ("[", "{"):
        raise UserError(f"value {text!r} is not valid JSON: write lists and objects as JSON, "
                        'e.g. ["sigmoid","sft"] or {"r":8}')
    return text


def parse_set(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value)."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise UserError(f"--set {item!r}: use KEY=VALUE or SECTION.KEY=VALUE, e.g. --set sft.max_steps=20")
    try:
        return parts, parse_value(value)
    except UserError as err:
        raise UserError(f"--set {key}: {err}") from None


def apply_sets(data: dict, items: Iterable[str]) -> dict:
    """`--set` items on top of a nested dict (a copy; sections are created as needed)."""
    out = copy.deepcopy(data)
    for item in items:
        path, value = parse_set(item)
        node = out
        for i, part in enumerate(path[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {'.'.join(path[:i + 1])} is a value, not a section")
        node[path[-1]] = value
    return out


def format_set(key: str, value: Any) -> str:
    """The inverse of parse_set for one key: parse_set(format_set(k, v)) == ([k...], v)."""
    return f"{key}={json.dumps(value, separators=(',', ':'), ensure_ascii=False)}"
