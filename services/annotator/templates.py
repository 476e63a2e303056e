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


# What moaa fills in, per kind and scope (judging.py), and what a template of that kind must show the judge.
SUPPLIED = {("pointwise", "all"): {"instruction", "candidates", "n", "scale_min", "scale_max"},
            ("pointwise", "single"): {"instruction", "answer", "scale_min", "scale_max"},
            ("pairwise", "all"): {"instruction", "answer_a", "answer_b"},
            ("aggregator", "all"): {"instruction", "candidates", "n", "scale_min", "scale_max", "ratings"}}
REQUIRED = {("pointwise", "all"): {"candidates"}, ("pointwise", "single"): {"answer"},
            ("pairwise", "all"): {"answer_a", "answer_b"}, ("aggregator", "all"): {"candidates", "ratings"}}


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


def _placeholders(name: str, text: str) -> set[str]:
    names = set()
    for m in string.Template.pattern.finditer(text):
        if m.group("invalid") is not None:   # string.Template would fail on it at every request
            line = text.count("\n", 0, m.start("invalid")) + 1
            raise TemplateError(f"template {name!r}: a '$' on line {line} of its section is not followed by a "
                                "placeholder name: write $$ for a literal dollar sign")
        if m.group("named") or m.group("braced"):
            names.add(m.group("named") or m.group("braced"))
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
    if scope == "single" and kind != "pointwise":
        raise TemplateError(f"template {name!r}: scope 'single' is for pointwise templates, not {kind}")
    system = "\n".join(sections.get("system", [])).strip()
    user = "\n".join(sections["user"]).strip()
    used = _placeholders(name, system) | _placeholders(name, user)
    unknown = sorted(used - SUPPLIED[kind, scope])
    if unknown:
        raise TemplateError(f"template {name!r} ({kind}, scope {scope}) uses ${', $'.join(unknown)}, which moaa "
                            f"does not fill; it fills ${', $'.join(sorted(SUPPLIED[kind, scope]))}")
    missing = sorted(REQUIRED[kind, scope] - used)
    if missing:
        raise TemplateError(f"template {name!r} ({kind}, scope {scope}) never shows the judge "
                            f"${', $'.join(missing)}: add it to the [user] section")
    return JudgeTemplate(
        name=name, kind=kind, scope=scope, system=system, user=user,
        sha256=hashlib.sha256(raw).hexdigest(), description=header.get("description", ""),
        placeholders=frozenset(used),
    )


class TemplateStore:
    """Templates by name, from the built-in folder and optional extra folders (later ones win)."""

    def __init__(self, extra_dirs: list[str | Path] | None = None):
        for d in extra_dirs or []:
            if not Path(d).is_dir():   # a typo would silently judge with the built-ins
                raise TemplateError(f"templates_dir {str(d)!r} is not a folder (a relative path is taken from the "
                                    f"working directory, {Path.cwd()})")
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
                try:
                    tpl = parse_template(name, path.read_bytes())
                except TemplateError as err:   # which file: a built-in or the user's override
                    raise TemplateError(f"{err} ({path})") from None
                self._cache[name] = tpl
                return tpl
        raise TemplateError(f"unknown judge template {name!r}; known: {', '.join(self.names())}")
