"""Data checks before any step: each bad file stops the CLI with exit 2 and one line naming the rows."""
from __future__ import annotations


import pytest

from moaa.cli.main import main
from moaa.errors import UserError
from moaa.trainer.data import check_lengths, load_rows
from tests.fixtures.trainer import pref_rows, sft_rows, write_jsonl

U = {"role": "user", "content": "Hi?"}
A = {"role": "assistant", "content": "Hello."}


def _cli(kind, path, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["train", kind, "--data", str(path), "--model", str(tmp_path / "no-model"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert not out.exists(), "nothing may start before the data is checked"
    return err


def test_not_json(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [sft_rows(1)[0], '{"messages": [', sft_rows(2)[1], "not json at all"])
    err = _cli("sft", path, tmp_path, capsys)
    assert "2 bad row(s)" in err and "line 2" in err and "line 4" in err and "not JSON" in err


def test_wrong_schema(tmp_path, capsys):
    rows = [{"id": "a", "conversation": [U, A]}, {"id": "b", "messages": [U, {"role": "bot", "content": "x"}]}]
    err = _cli("sft", write_jsonl(tmp_path / "d.jsonl", rows), tmp_path, capsys)
    assert "line 1 (id a): missing field 'messages'" in err
    assert "line 2 (id b): messages[1] has role 'bot'" in err


def test_empty_assistant_turn(tmp_path, capsys):
    rows = sft_rows(2) + [{"id": "e", "messages": [U, {"role": "assistant", "content": "  "}]}]
    err = _cli("sft", write_jsonl(tmp_path / "d.jsonl", rows), tmp_path, capsys)
    assert "line 3 (id e): messages[1] (assistant) is empty" in err


def test_chosen_equals_rejected(tmp_path, capsys):
    rows = pref_rows(2)
    rows[1]["rejected"] = rows[1]["chosen"]
    err = _cli("dpo", write_jsonl(tmp_path / "p.jsonl", rows), tmp_path, capsys)
    assert "line 2 (id p1): chosen equals rejected" in err


def test_pretemplated_strings_are_refused(tmp_path, capsys):
    rows = [{"id": "t", "prompt": "<|im_start|>user\nHi?<|im_end|>\n", "chosen": "Hello", "rejected": "Go away"}]
    err = _cli("dpo", write_jsonl(tmp_path / "p.jsonl", rows), tmp_path, capsys)
    assert "id t" in err and "pre-templated string" in err
    err = _cli("sft", write_jsonl(tmp_path / "s.jsonl", [{"id": "x", "text": "<s>[INST] hi [/INST] yo"}]), tmp_path, capsys)
    assert "pre-templated text" in err


def test_wrong_kind_of_file(tmp_path, capsys):
    err = _cli("sft", write_jsonl(tmp_path / "p.jsonl", pref_rows(2)), tmp_path, capsys)
    assert "a preference row where an SFT row" in err and "line 1 (id p0), line 2 (id p1)" in err


@pytest.mark.parametrize("messages,problem", [
    ([A, U], "messages[0] is 'assistant' where 'user' is expected"),
    ([U, U, A], "messages[1] is 'user' where 'assistant' is expected"),
    ([U], "messages must end with a assistant message"),
    ([{"role": "system", "content": "s"}], "holds only a system message"),
    ([U, {"role": "system", "content": "late"}, A], "messages[1] is 'system' where 'assistant' is expected"),
    ([], "must be a non-empty list"),
    ([U, {"role": "assistant", "content": 3}], "content must be a string"),
])
def test_conversation_shape(tmp_path, messages, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "r", "messages": messages}])
    with pytest.raises(UserError, match="line 1 \\(id r\\)") as info:
        load_rows(path, "sft")
    assert problem in str(info.value)


@pytest.mark.parametrize("field,value,problem", [
    ("chosen", [A, A], "exactly one assistant message"),
    ("rejected", [U], "rejected[0] has role 'user'"),
    ("prompt", [U, A], "prompt must end with a user message"),
])
def test_preference_shape(tmp_path, field, value, problem):
    row = pref_rows(1)[0] | {field: value}
    with pytest.raises(UserError, match="line 1") as info:
        load_rows(write_jsonl(tmp_path / "p.jsonl", [row]), "dpo")
    assert problem in str(info.value)


def test_duplicates_dropped_and_counted_duplicate_ids_refused(tmp_path):
    rows = sft_rows(3)
    copy = dict(rows[0], id="again")
    kept, report = load_rows(write_jsonl(tmp_path / "d.jsonl", rows + [copy, ""]), "sft")
    assert [r["id"] for r in kept] == ["s0", "s1", "s2"]
    assert report.dropped == {"duplicate of s0": ["again"]} and report.blank_lines == 1
    assert report.summary()["dropped"]["duplicate of s0"]["count"] == 1
    with pytest.raises(UserError, match="line 4 \\(id again\\): same content as s0"):
        load_rows(write_jsonl(tmp_path / "d.jsonl", rows + [copy]), "sft", drop_duplicates=False)
    with pytest.raises(UserError, match="line 4 \\(id s1\\): duplicate id, first on line 2"):
        load_rows(write_jsonl(tmp_path / "d.jsonl", rows + [sft_rows(5)[4] | {"id": "s1"}]), "sft")


def test_overlong_rows_stop_or_are_dropped_and_counted(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = sft_rows(2) + [{"id": "long", "messages": [U, {"role": "assistant", "content": "word " * 400}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    kept, report = load_rows(path, "sft")
    with pytest.raises(UserError, match=r"line 3 \(id long\): \d+ tokens > max_length 200 .*drop_overlong"):
        check_lengths(kept, report, tok, 200)
    kept = check_lengths(kept, report, tok, 200, drop_overlong=True)
    assert [r["id"] for r in kept] == ["s0", "s1"] and report.dropped == {"longer than max_length 200": ["long"]}
    assert report.rows_kept == 2


def test_many_bad_rows_one_line_capped(tmp_path):
    rows = [{"id": f"x{i}", "messages": [U]} for i in range(20)]
    with pytest.raises(UserError) as info:
        load_rows(write_jsonl(tmp_path / "d.jsonl", rows), "sft")
    msg = str(info.value)
    assert "20 bad row(s)" in msg and "and 12 more" in msg and "\n" not in msg


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_rows(tmp_path / "nope.jsonl", "sft")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="no usable rows"):
        load_rows(tmp_path / "e.jsonl", "sft")


def test_multi_gpu_launch_checks_data_once_before_starting_workers(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [sft_rows(1)[0], "{broken"])
    rc = main(["train", "sft", "--data", str(path), "--model", "m", "--out", str(tmp_path / "o"),
               "--nproc-per-node", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "line 2: not JSON" in err and len(err.splitlines()) == 1
