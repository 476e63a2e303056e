"""Generate the Python gRPC stubs from proto/ into moaa/v1/ (the one reproducible step).

Run: python tools/gen_proto.py           (writes the stubs)
     python tools/gen_proto.py --check   (exits 1 if the committed stubs are stale)
"""
from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc
import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out_dir: Path) -> list[Path]:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in (out_dir / "moaa" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    target = ROOT / "moaa" / "v1"
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        if args.check:
            stale = [g.name for g in generated if not (target / g.name).exists()
                     or not filecmp.cmp(g, target / g.name, shallow=False)]
            if stale:
                print(f"stale generated stubs: {', '.join(stale)}; run python tools/gen_proto.py")
                return 1
            return 0
        target.mkdir(parents=True, exist_ok=True)
        for g in generated:
            (target / g.name).write_bytes(g.read_bytes())
    (target / "__init__.py").write_text('"""Generated from proto/moaa/v1 by tools/gen_proto.py; do not edit."""\n')
    return 0


if __name__ == "__main__":
    sys.exit(main())
