"""Versioned judging prompt templates, loaded from text files, hashed for provenance.

A template file is a header of `key: value` lines, then a `[system]` section and a `[user]` section.
Placeholders use `$name` (string.Template), so JSON braces in instructions need no escaping. The
sha256 of the file's bytes is recorded in every annotation, so a changed prompt is always visible.
Header keys: `kind` (pointwise | pairwise | aggregator), `scope` (all: every answer in one call;
single: one answer per call; pointwise only), `description`.
"""
from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass, field
from pathlib import Path

BUILTIN_DIR = Path(__file__).with_name("templates")
KINDS = ("pointwise", "pairwise", "aggregator")


class TemplateError(ValueError):
    """A template that is missing or cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class JudgeTemplate:
    name: str
    kind: str
    scope: str
    system: str
    user: str
    sha256: str
    description: str = ""
    placeholders: frozenset[str] = field(default_factory=frozenset)

    def render(self, **values: object) -> list[dict[str, str]]:
        """Chat messages for one judge call; every placeholder the template uses must be given."""
        subst = {k: str(v) for k, v in values.items()}
        missing = sorted(self.placeholders - set(subst))
        if missing:
            raise TemplateError(f"template {self.name!r} needs values for: {', '.join(missing)}")
        messages = []
        if self.system:
            messages.append({"role": "system", "content": string.Template(self.system).substitute(subst)})
        messages.append({"role": "user", "content": string.Template(self.user).substitute(subst)})
        return messages


def _placeholders(text: str) -> set[str]:
    names = set()
    for m in string.Template.pattern.finditer(text):
        name = m.group("named") or m.group("braced")
        if name:
            names.add(name)
    return names


def parse_template(name: str, raw: bytes) -> JudgeTemplate:
    text = raw.decode("utf-8")
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped in ("[system]", "[user]"):
            current = stripped[1:-1]
            sections[current] = []
        elif current is None:
            if stripped and not stripped.startswith("#"):
                key, sep, value = stripped.partition(":")
                if not sep:
                    raise TemplateError(f"template {name!r}: header line {line!r} is not 'key: value'")
                header[key.strip()] = value.strip()
        else:
            sections[current].append(line)
    if "user" not in sections:
        raise TemplateError(f"template {name!r} has no [user] section")
    kind = header.get("kind", "")
    if kind not in KINDS:
        raise TemplateError(f"template {name!r}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    scope = header.get("scope", "all")
    if scope not in ("all", "single"):
        raise TemplateError(f"template {name!r}: scope must be 'all' or 'single', not {scope!r}")
    system = "\n".join(sections.get("system", [])).strip()
    user = "\n".join(sections["user"]).strip()
    return JudgeTemplate(
        name=name, kind=kind, scope=scope, system=system, user=user,
        sha256=hashlib.sha256(raw).hexdigest(), description=header.get("description", ""),
        placeholders=frozenset(_placeholders(system) | _placeholders(user)),
    )


class TemplateStore:
    """Templates by name, from the built-in folder and optional extra folders (later ones win)."""

    def __init__(self, extra_dirs: list[str | Path] | None = None):
        self._dirs = [BUILTIN_DIR, *[Path(d) for d in (extra_dirs or [])]]
        self._cache: dict[str, JudgeTemplate] = {}

    def names(self) -> list[str]:
        found = set()
        for d in self._dirs:
            found.update(p.stem for p in d.glob("*.txt"))
        return sorted(found)

    def get(self, name: str) -> JudgeTemplate:
        if name in self._cache:
            return self._cache[name]
        for d in reversed(self._dirs):
            path = d / f"{name}.txt"
            if path.is_file():
                tpl = parse_template(name, path.read_bytes())
                self._cache[name] = tpl
                return tpl
        raise TemplateError(f"unknown judge template {name!r}; known: {', '.join(self.names())}")
