"""Stage 2 sampling: n answers per prompt from the SFT model, ready for the annotator.

Output rows: {"id", "prompt": [messages], "candidates": [{"id", "text", "model"}], "sampling": {...}}.
Prompts are read by the one loader (`moaa.prompts`, keeping the rows' own ids) and the
output goes through the one resumable writer (`moaa.jsonl`): appended row by row, fsynced, resumed by
id; a killed run started again with the same arguments finishes with every prompt exactly once. vLLM's offline
engine is used on a GPU node when it is installed; transformers' batched generate otherwise.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

from moaa.engines import pick_engine
from moaa.errors import UserError
from moaa.jsonl import JsonlAppender

PROGRESS_EVERY_S = 5.0   # the JSON progress lines on stdout, at most one per this many seconds


@dataclass
class SampleSettings:
    n: int = 5
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 512
    batch_size: int = 8
    seed: int = 0
    engine: str = "auto"  # auto | vllm | transformers

    def check(self) -> None:
        if self.n < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise UserError("--n, --batch-size and --max-new-tokens must be at least 1")
        if self.temperature <= 0 and self.n > 1:
            raise UserError("n > 1 needs temperature > 0 (greedy decoding gives n equal answers)")
        if not 0 < self.top_p <= 1:
            raise UserError("--top-p must be in (0, 1]")


def _batches(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _transformers_generate(model_dir: str, s: SampleSettings):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise UserError(f"model {model_dir} has no chat template (train it with moaa train sft first)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.to(device).eval()

    def generate(batch: list[dict]) -> list[list[str]]:
        texts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in batch]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        # seeded from the batch's first id: a resumed run draws the same answers for the same batches
        torch.manual_seed(s.seed + int(hashlib.sha1(batch[0]["id"].encode()).hexdigest()[:8], 16))
        with torch.no_grad():
            out = model.generate(**enc, do_sample=s.temperature > 0, temperature=s.temperature or None,
                                 top_p=s.top_p, max_new_tokens=s.max_new_tokens, num_return_sequences=s.n,
                                 pad_token_id=tok.pad_token_id)
        answers = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return [[a.strip() for a in answers[i * s.n:(i + 1) * s.n]] for i in range(len(batch))]

    return generate


def _vllm_generate(model_dir: str, s: SampleSettings):
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, seed=s.seed)
    params = SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                            seed=s.seed)

    def generate(batch: list[dict]) -> list[list[str]]:
        outs = llm.chat([r["prompt"] for r in batch], params, use_tqdm=False)
        return [[c.text.strip() for c in o.outputs] for o in outs]

    return generate


def run_sample(model_spec: str, prompts: str, out: str, s: SampleSettings, *, quiet: bool = False,
               skip_invalid: bool = False) -> dict:
    from moaa.lock import output_lock
    from moaa.models import resolve_model

    s.check()
    with output_lock(Path(out), "moaa sample"):   # one writer per --out: two would sample the same ids twice
        model = resolve_model(model_spec)  # what --model takes everywhere: packaged name, folder, GGUF file, hub id
        return _sample(model, prompts, out, s, quiet, skip_invalid)


def _sample(model, prompts: str, out: str, s: SampleSettings, quiet: bool, skip_invalid: bool = False) -> dict:
    from moaa.idset import IdSet
    from moaa.progress import StageProgress
    from moaa.prompts import PromptStream

    writer = JsonlAppender(out)
    done = IdSet(r["id"] for r in writer.open_iter())
    # two reads of the prompts (a count for the progress bar and a check of every row before a model loads,
    # then the rows): memory stays one batch and 16 bytes per done id, whatever the prompt count
    total = todo = 0
    check = PromptStream(prompts, keep_ids=True, skip_invalid=skip_invalid)
    for r in check:
        total, todo = total + 1, todo + (r.id not in done)
    to_do = ({"id": r.id, "prompt": r.messages} for r in PromptStream(prompts, keep_ids=True, skip_invalid=skip_invalid)
             if r.id not in done)
    engine = pick_engine(s.engine, vllm_on_cpu=False)
    summary = {"event": "sample", "prompts": total, "already_done": total - todo, "engine": engine}
    if check.invalid:   # --skip-invalid: counted and named, never silently dropped
        summary["invalid_skipped"] = check.invalid
        summary["invalid_lines"] = [line for line, _ in check.skipped]
    print(json.dumps(summary), flush=True)
    # says at once, before a model loads, how many are done and left (or that nothing is left)
    bar = StageProgress("sampling", total, total - todo, unit="prompt", quiet=quiet)
    if not todo:
        bar.close()
        return summary
    from moaa.progress import quiet_progress_bars

    quiet_progress_bars()   # the loading bars' carriage returns, in a log; ours is the one bar
    generate = (_vllm_generate if engine == "vllm" else _transformers_generate)(model.engine_arg, s)
    sampling = {**asdict(s), "engine": engine}
    model_name = model.default_name
    # vLLM schedules its own batches: hand it larger chunks, written as each finishes
    chunk = s.batch_size if engine == "transformers" else max(s.batch_size, 256)
    done_n, said = total - todo, time.monotonic()
    bar.started()   # the rate and ETA count from here, not from before the model loaded
    with bar:
        for batch in _batches(to_do, chunk):
            for row, answers in zip(batch, generate(batch)):
                cands = [{"id": f"c{i}", "text": t, "model": model_name} for i, t in enumerate(answers)]
                writer.append({"id": row["id"], "prompt": row["prompt"], "candidates": cands, "sampling": sampling})
            bar.advance(len(batch))
            done_n += len(batch)
            if time.monotonic() - said >= PROGRESS_EVERY_S or done_n == total:
                # for a parent following stdout (the pipeline's stage-2 bar): bounded, as the bar's own lines
                print(json.dumps({"event": "progress", "done": done_n, "total": total}), flush=True)
                said = time.monotonic()
    summary["written"] = todo
    return summary
