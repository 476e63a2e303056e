"""Stage-2 sampling with transformers on the tiny SFT model: format, n answers, resume by id, bad input."""
from __future__ import annotations

import json

import pytest

from moaa.cli.main import main
from tests.fixtures.trainer import sft_rows, write_jsonl

pytestmark = pytest.mark.slow


def _prompts(tmp_path, n=5):
    rows = [{"id": f"q{i}", "prompt": [{"role": "user", "content": f"Name {i} colours."}]} for i in range(n - 1)]
    rows.append(sft_rows(1)[0])  # an SFT row: its prompt is the conversation up to the last user turn
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def _run(model, prompts, out, *extra):
    return main(["sample", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--n", "3",
                 "--max-new-tokens", "6", "--batch-size", "2", "--engine", "transformers", *extra])


def test_sample_rows_for_the_annotator_and_resume(tiny_sft_dir, tmp_path, capsys):
    prompts, out = _prompts(tmp_path), tmp_path / "cands.jsonl"
    assert _run(tiny_sft_dir, prompts, out) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q0", "q1", "q2", "q3", "s0"]
    for r in rows:
        assert len(r["candidates"]) == 3 and all(set(c) == {"id", "text", "model"} for c in r["candidates"])
        assert r["prompt"][-1]["role"] == "user" and r["sampling"]["n"] == 3
        assert r["sampling"]["engine"] == "transformers"
    assert rows[-1]["prompt"] == sft_rows(1)[0]["messages"][:2]

    # killed mid-run: two rows written and a third cut mid-line; the rerun writes each missing id once
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:20])
    capsys.readouterr()
    assert _run(tiny_sft_dir, prompts, out) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["already_done"] == 2 and summary["engine"] == "transformers"
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in again) == ["q0", "q1", "q2", "q3", "s0"]
    # a finished run started again does nothing
    assert _run(tiny_sft_dir, prompts, out) == 0
    assert len(out.read_text().splitlines()) == 5


def test_sample_bad_prompts_exit_2(tiny_sft_dir, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": [{"role": "user", "content": ""}]}, "nope",
                                             {"id": "b", "text": "hi"}])
    assert _run(tiny_sft_dir, bad, tmp_path / "o.jsonl") == 2
    err = capsys.readouterr().err.strip()
    # the pipeline's one prompt loader: the same checks and messages as `moaa pipeline check-prompts`
    assert len(err.splitlines()) == 1 and "3 invalid row(s)" in err
    assert "line 1: prompt[0] (user) is empty" in err and "line 2: not valid JSON" in err
    assert "line 3: missing prompt field" in err
    assert _run(tiny_sft_dir, _prompts(tmp_path), tmp_path / "o.jsonl", "--temperature", "0") == 2
    assert "needs temperature > 0" in capsys.readouterr().err
    # the flag the error names exists: the bad rows are skipped, counted and named by line
    good = write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "prompt": "hi"}, "nope", {"id": "b", "prompt": "yo"}])
    assert _run(tiny_sft_dir, good, tmp_path / "o.jsonl", "--skip-invalid") == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["prompts"] == 2 and summary["invalid_skipped"] == 1 and summary["invalid_lines"] == [2]
    assert [json.loads(x)["id"] for x in (tmp_path / "o.jsonl").read_text().splitlines()] == ["a", "b"]


@pytest.mark.parametrize("flag,value,words", [
    ("--temperature", "nan", "finite number"), ("--temperature", "inf", "finite number"),
    ("--temperature", "-1", "greater than or equal to 0"), ("--temperature", "2.5", "less than or equal to 2"),
    ("--top-p", "0", "greater than 0"), ("--n", "100000", "at most 64 answers per prompt"),
])
def test_sample_settings_out_of_range_exit_2(tmp_path, capsys, flag, value, words):
    """Checked while parsing, before a model loads: no `Infinity` written into rows, no allocator error."""
    with pytest.raises(SystemExit) as exc:
        _run(tmp_path / "no-model", tmp_path / "p.jsonl", tmp_path / "o.jsonl", flag, value)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"argument {flag}" in err and words in err, err
