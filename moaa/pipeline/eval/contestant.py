"""`moaa eval --contestant NAME=URL#model`: any OpenAI-compatible endpoint (a vLLM model, a hosted API,
the gateway's own HTTP door with a recipe as the model) answers the baseline's prompts, and those
answers are judged. Answers are kept keyed by prompt id in the eval folder, so a rerun asks only for
the missing ones; a failed request is recorded and retried on the next run, never judged as empty.
"""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path

from moaa.errors import TransientError, UserError

from moaa.progress import StageProgress
from ..store import DatasetStore


_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclass
class Contestant:
    name: str
    url: str        # base URL, …/v1
    model: str      # model name sent in requests (a recipe name on the gateway's door)


def parse_contestant(text: str) -> Contestant:
    """'NAME=URL#model' -> Contestant; a UserError saying what to write otherwise."""
    name, eq, rest = text.partition("=")
    url, hash_, model = rest.rpartition("#")
    if not (eq and hash_ and name.strip() and url.strip() and model.strip()):
        raise UserError(f"--contestant {text!r}: write NAME=URL#model, e.g. moa=http://127.0.0.1:8080/v1#default")
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--contestant {text!r}: the URL must start with http:// or https://")
    if not _NAME.fullmatch(name.strip()) or name.strip() in (".", ".."):  # it names a folder of the run (answers-NAME)
        raise UserError(f"--contestant {text!r}: NAME may hold letters, digits, '.', '_' and '-' only (it names "
                        "the folder of its answers)")
    return Contestant(name.strip(), url.strip().rstrip("/"), model.strip())


async def contestant_answers(c: Contestant, prompts: dict[str, tuple[list[dict], str]], out: Path, *,
                             api_key_env: str | None = None, max_tokens: int | None = None,
                             concurrency: int = 4, quiet: bool = False) -> dict[str, tuple[list[dict], str]]:
    """id -> (prompt, answer) from the endpoint, for every prompt of `prompts` (resumable)."""
    from moaa.services.backend import BackendPool
    from moaa.services.config import parse_backend

    # a MoA call streams nothing until its proposers answered: wait for the first token like a batch job
    cfg = parse_backend({"urls": [c.url], "served_model": c.model, "api_key_env": api_key_env,
                         "timeouts": {"first_token_s": 900, "total_s": 1800}, "max_concurrency": concurrency},
                        f"--contestant {c.name}")
    store = DatasetStore(out / f"answers-{c.name}", stage="answers", fmt="generations").open()
    todo = [rid for rid in prompts if not store.is_done(rid)]
    progress = StageProgress(f"answers of {c.name}", len(prompts), len(prompts) - len(todo), quiet=quiet)
    sem = asyncio.Semaphore(concurrency)
    sampling = {"max_tokens": max_tokens} if max_tokens else None

    async def one(client, rid: str) -> None:
        async with sem:
            try:
                res = await client.chat(prompts[rid][0], sampling)
            except Exception as err:  # noqa: BLE001 - recorded, retried on the next run
                store.fail(rid, f"{type(err).__name__}: {err}")
                progress.advance(failed=True)
                return
        store.write({"id": rid, "prompt": prompts[rid][0], "answer": res.text, "model": c.name,
                     "finish_reason": res.finish_reason})
        progress.advance()

    async with BackendPool({c.name: cfg}, probes=False) as pool:
        with progress:
            await asyncio.gather(*(one(pool.client(c.name), rid) for rid in todo))
    store.write_manifest(complete=not store.failed, endpoint=c.url, model=c.model)
    if store.failed:
        first = next(iter(store.failed.values()))
        raise TransientError(f"{len(store.failed)} answers of {c.name} failed (first: {first}); re-run to retry them")
    return {row["id"]: (row["prompt"], row["answer"]) for row in store.iter_rows()}
