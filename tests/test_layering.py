"""The import rules between the layers, read from the source with `ast` (nothing is imported):
- moaa core (the modules directly under moaa/: errors, files, jsonl, models, prompts, ...) imports only core;
- the trainer imports only core and itself (it runs in its own image and Job);
- the client package never imports the pipeline or the CLI;
- services never import the pipeline, the CLI or the trainer.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# repository folder -> the package it installs as (setup.py maps services/ and trainer/ into moaa)
PACKAGES = {"moaa": "moaa", "services": "moaa.services", "trainer": "moaa.trainer"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every moaa module a file imports, relative imports resolved, at any depth (lazy imports too)."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from moaa import pipeline`
    return {m for m in found if m == "moaa" or m.startswith("moaa.")}


def files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py")))


CORE = {p.stem for p in (ROOT / "moaa").glob("*.py") if p.stem != "__init__"}


def is_core(mod: str) -> bool:
    parts = mod.split(".")
    return mod == "moaa" or (parts[1] in CORE) or parts[1] == "v1"


def under(mod: str, *packages: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in packages)


def broken(folder: str, allowed) -> list[str]:
    return [f"{p.relative_to(ROOT)} imports {m}" for p in files(folder) for m in sorted(imports_of(p)) if not allowed(m)]


def test_the_parser_sees_imports():
    """The rule checks below would pass vacuously if the parser missed imports."""
    assert "moaa.errors" in imports_of(ROOT / "trainer" / "runner.py")
    assert "moaa.services.common.stream" in imports_of(ROOT / "services" / "gateway" / "servicer.py")


@pytest.mark.parametrize("folder, allowed", [
    ("trainer", lambda m: is_core(m) or under(m, "moaa.trainer")),
    ("moaa/client", lambda m: not under(m, "moaa.pipeline", "moaa.cli")),
    ("services", lambda m: not under(m, "moaa.pipeline", "moaa.cli", "moaa.trainer")),
])
def test_layer_imports(folder, allowed):
    assert broken(folder, allowed) == []


def test_core_imports_only_core():
    core = [ROOT / "moaa" / f"{name}.py" for name in sorted(CORE)]
    assert [f"{p.name} imports {m}" for p in core for m in sorted(imports_of(p)) if not is_core(m)] == []
