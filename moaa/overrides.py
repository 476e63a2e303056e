"""The one `--set KEY.PATH=VALUE` grammar of every moaa command (pipeline, train, submit).

A value is JSON when it parses as JSON (numbers, true/false/null, "quoted strings", lists, objects) and
a bare string otherwise, so `save_strategy=no` stays the string "no" (YAML 1.1 would read it as false).
Text that starts like a list or object but is not valid JSON is refused rather than kept as a string:
`loss_type=[a, b]` is almost surely meant as a list. `format_set` writes the grammar back (values as
JSON), so argv built from a config parses into the same config. Config files (`--config`, YAML or JSON, and
the services' moaa config) are read by `load_mapping` with the same typing: YAML 1.2 scalars, so `no` stays a string and `1e-8` (valid
JSON, a string to YAML 1.1) is a float.

A leaf module: the trainer, which imports nothing else of moaa but errors, uses it too.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

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


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core booleans and floats: only true/false are booleans, `1e-8` is a float
    (Helm writes small numbers so). A key repeated in one mapping is an error: PyYAML would keep the last
    one, so a copied block whose name was not changed would silently replace the first."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        f"while reading the mapping that starts at line {node.start_mark.line + 1}", None,
                        f"key {key!r} is given twice (first at line {seen[key] + 1}): remove or rename one",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(  # after int: "12" stays an int
    _FLOAT, re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _yaml_error(err: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: what it was reading, what is wrong, where."""
    if not isinstance(err, yaml.MarkedYAMLError):
        return " ".join(str(err).split())
    parts = [text + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")
             for text, mark in ((err.context, err.context_mark), (err.problem, err.problem_mark)) if text]
    return ": ".join(parts) or " ".join(str(err).split())


def load_mapping(path: str | Path, what: str = "config file") -> dict:
    """A YAML or JSON config file as a dict; errors are one-line UserErrors naming the file."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except OSError as err:   # a folder, no permission
        raise UserError(f"cannot read {what} {path}: {err.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise UserError(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start}, line {line}): "
                        "save it as UTF-8") from None
    try:
        loaded = yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        raise UserError(f"{what} {path} is not valid YAML: {_yaml_error(err)}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise UserError(f"{what} {path} must hold a mapping of fields")
    return loaded or {}
