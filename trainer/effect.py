"""`moaa logprobs`: summed log-probabilities of completions under one or more models (the torch side of the
pipeline's judge-independent training-effect measures).

Input rows: {"id", "prompt": [messages], "completion": [messages], "models"?: [names]} (without
"models", every model scores the row). The prompt is rendered with the chat
template and the generation prompt; the completion is what the template adds after it, tokenized
separately and appended, as TRL's SFT/DPO trainers build their sequences. Output, per model and row id:
[sum of log p(completion token | prefix), completion tokens]. Models are loaded one at a time.
"""
from __future__ import annotations

import json
from pathlib import Path

from moaa.errors import UserError


def load_items(path: str | Path) -> list[dict]:
    """Rows {id, prompt, completion[, models]}, messages read as every moaa input reads them; a bad row or a
    repeated id stops the run naming its line, before any model loads."""
    from moaa.jsonl import read_input
    from moaa.prompts import RowError, as_messages

    rows, first = [], {}
    for lineno, row in read_input(Path(path), "items"):
        where = f"{path}: line {lineno}"
        rid = row.get("id")
        if not (isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list)) or not (
                isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid)):
            raise UserError(f"{where}: expected {{id, prompt: [messages], completion: [messages]}}")
        try:
            row = {**row, "prompt": as_messages(row["prompt"], "prompt"),
                   "completion": as_messages(row["completion"], "completion")}
        except RowError as err:
            raise UserError(f"{where}: {err}") from None
        if "models" in row and not (isinstance(row["models"], list) and all(isinstance(m, str) for m in row["models"])):
            raise UserError(f"{where}: 'models' must be a list of model names")
        if str(rid) in first:   # one value per id in the output: a second row would replace the first's
            raise UserError(f"{where}: id {rid!r} appears twice (first at line {first[str(rid)]})")
        first[str(rid)] = lineno
        rows.append(row)
    return rows


def encode(tok, prompt: list[dict], completion: list[dict], max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + completion, and where the completion starts (truncated to max_length:
    the completion's end is cut first, then the prompt's start)."""
    prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template(prompt + completion, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise UserError("the chat template renders the prompt differently once the answer follows; "
                        "cannot tell the answer's tokens apart")
    p = tok(prompt_text, add_special_tokens=False)["input_ids"]
    c = tok(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    c = c[:max(1, max_length - len(p))]
    p = p[-max(1, max_length - len(c)):]
    return p + c, len(p)


def completion_logprobs(model, seqs: list[tuple[list[int], int]], pad_id: int) -> list[tuple[float, int]]:
    """For each (ids, start): the sum of log p(ids[t] | ids[:t]) over t >= start, and the count of those
    tokens. One forward pass for the batch, right-padded and masked (padding comes after every real token,
    so a causal model's real positions see none of it)."""
    import torch

    width = max(len(ids) for ids, _ in seqs)
    x = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in seqs], device=model.device)
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in seqs], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(2, x[:, 1:, None])[:, :, 0]
    out = []
    for row, (ids, start) in enumerate(seqs):
        out.append((float(logp[row, start - 1:len(ids) - 1].sum()), len(ids) - start))
    return out


def model_logprobs(model_dir: str, items: list[dict], max_length: int = 512, batch_size: int = 8) -> dict[str, list]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if not tok.chat_template:
        raise UserError(f"model {model_dir} has no chat template")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    encoded = {row["id"]: encode(tok, row["prompt"], row["completion"], max_length) for row in items}
    ids = sorted(encoded, key=lambda k: len(encoded[k][0]))  # similar lengths per batch: little padding
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = {}
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        for rid, value in zip(chunk, completion_logprobs(model, [encoded[k] for k in chunk], pad)):
            out[rid] = list(value)
    return {row["id"]: out[row["id"]] for row in items}


def run_logprobs(models: dict[str, str], items_path: str, out: str, max_length: int = 512) -> dict:
    """{name: {id: [sum_logp, n_tokens]}} for every model (a --model spec each), written atomically to `out`."""
    from moaa.files import atomic_write_json
    from moaa.models import resolve_model

    items = load_items(items_path)
    out_dir = Path(out).parent
    if not out_dir.is_dir():   # found after every model was scored otherwise
        raise UserError(f"--out {out}: folder {out_dir} does not exist")
    # every spec resolved before the first model loads: a bad last one fails at once, not after the others
    sources = {name: resolve_model(spec).engine_arg for name, spec in models.items()}
    result = {}
    for name, path in sources.items():
        mine = [r for r in items if name in r.get("models", [name])]  # a row may name the models it needs
        result[name] = model_logprobs(path, mine, max_length) if mine else {}
        print(json.dumps({"event": "logprobs", "model": name, "rows": len(mine)}), flush=True)
    atomic_write_json(Path(out), result)
    return result
