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
    """Rows {id, prompt, completion}; a bad row stops the run naming its line."""
    from moaa.services.annotator.batch import read_jsonl

    rows = []
    for lineno, row in read_jsonl(Path(path), "items file"):
        if not (isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list) and row.get("id")):
            raise UserError(f"{path}: line {lineno}: expected {{id, prompt: [messages], completion: [messages]}}")
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


def completion_logprob(model, ids: list[int], start: int) -> tuple[float, int]:
    """Sum of log p(ids[t] | ids[:t]) over t >= start, and the count of those tokens."""
    import torch

    x = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=x).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, x[0, 1:, None])[:, 0]
    return float(logp[start - 1:].sum()), len(ids) - start


def model_logprobs(model_dir: str, items: list[dict], max_length: int = 512) -> dict[str, list]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise UserError(f"model folder {model_dir} holds no config.json")
    tok = AutoTokenizer.from_pretrained(model_dir)
    if not tok.chat_template:
        raise UserError(f"model {model_dir} has no chat template")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    for row in items:
        ids, start = encode(tok, row["prompt"], row["completion"], max_length)
        out[row["id"]] = list(completion_logprob(model, ids, start))
    return out


def run_logprobs(models: dict[str, str], items_path: str, out: str, max_length: int = 512) -> dict:
    """{name: {id: [sum_logp, n_tokens]}} for every model, written atomically to `out`."""
    from moaa.pipeline.store import atomic_write_json

    items = load_items(items_path)
    result = {}
    for name, path in models.items():
        mine = [r for r in items if name in r.get("models", [name])]  # a row may name the models it needs
        result[name] = model_logprobs(path, mine, max_length) if mine else {}
        print(json.dumps({"event": "logprobs", "model": name, "rows": len(mine)}), flush=True)
    atomic_write_json(Path(out), result)
    return result
