"""Prompt loading: formats, recognised shapes, stable ids, and readable errors with line numbers."""
import json
import subprocess
import sys

import pytest

from moaa.errors import UserError
from moaa.prompts import PromptStream, content_id, default_prompts_path, parse_mapping


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_bundled_default_prompts():
    ps = PromptStream()
    rows = list(ps)
    assert 45 <= len(rows) <= 60 and not ps.skipped
    assert any(len(r.messages) > 1 for r in rows)          # a few multi-turn conversations
    assert len({r.id for r in rows}) == len(rows)
    assert default_prompts_path().name == "default.jsonl"


def test_recognised_shapes_without_mapping(tmp_path):
    rows = [
        {"instruction": "UltraFeedback style", "completions": [{"response": "x"}]},
        {"prompt": "ultrafeedback_binarized style", "prompt_id": "p1", "chosen": [], "rejected": []},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "fine"}]},
        {"id": "u7", "data": ["q1", "a1", "q2"]},                # original UltraChat
        {"prompt": [{"role": "user", "content": "TRL preference prompt"}], "chosen": [], "rejected": []},
    ]
    ps = PromptStream(_write_jsonl(tmp_path / "p.jsonl", rows))
    rows = list(ps)
    got = [r.messages for r in rows]
    assert got[0] == [{"role": "user", "content": "UltraFeedback style"}]
    assert rows[1].source_id == "p1"
    assert got[2][-1] == {"role": "user", "content": "how are you?"} and len(got[2]) == 3  # trailing answer dropped
    assert [m["role"] for m in got[3]] == ["user", "assistant", "user"] and rows[3].source_id == "u7"
    assert got[4] == [{"role": "user", "content": "TRL preference prompt"}]


def test_public_dataset_shapes(tmp_path):
    """Rows as the public sets ship them: nothing of the prompt is dropped, other roles' names are mapped."""
    rows = [
        {"instruction": "Translate to French", "input": "Hello world", "output": "Bonjour le monde"},   # Alpaca
        {"instruction": "Name a colour", "input": "", "output": "Blue"},
        {"instruction": "Summarise.", "context": "Dolly's passage.", "response": "Short.", "category": "summarization"},
        {"id": "sg1", "conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                                        {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "A joke?"}]},
        {"messages": [{"role": "developer", "content": "Be terse."},                        # OpenAI chat logs
                      {"role": "user", "content": [{"type": "text", "text": "Part one."},
                                                   {"type": "text", "text": "Part two. 🤖 日本語"}]}]},
        {"prompt": "How do I bake bread?", "prompt_id": "uc1",                             # UltraChat 200k
         "messages": [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Mix"}]},
    ]
    got = list(PromptStream(_write_jsonl(tmp_path / "p.jsonl", rows), keep_ids=True))
    assert got[0].messages == [{"role": "user", "content": "Translate to French\n\nHello world"}]
    assert got[1].messages == [{"role": "user", "content": "Name a colour"}]
    assert got[2].messages == [{"role": "user", "content": "Summarise.\n\nDolly's passage."}]
    got = got[:2] + got[3:]
    assert got[2].id == "sg1" and got[2].messages == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "A joke?"}]
    assert got[3].messages == [{"role": "system", "content": "Be terse."},
                               {"role": "user", "content": "Part one.\nPart two. 🤖 日本語"}]
    assert got[4].id == "uc1" and got[4].messages == [{"role": "user", "content": "How do I bake bread?"}]
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    tool = {"conversations": [{"from": "function_call", "value": "{}"}]}
    with pytest.raises(UserError) as err:
        list(PromptStream(_write_jsonl(tmp_path / "bad.jsonl", [image, tool])))
    assert "line 1: messages[0] content has a 'image_url' part" in str(err.value)
    assert "line 2: conversations[0] has role 'function_call'" in str(err.value)


def test_file_encodings_and_containers(tmp_path):
    """BOM, CRLF, blank lines, .jsonl.gz and a .json array read as JSON Lines are; a corrupt .gz is one line."""
    import gzip

    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n\r\n  \n{"prompt": "b\\r\\nc"}\r\n')
    rows = list(PromptStream(tmp_path / "bom.jsonl"))
    assert [r.messages[0]["content"] for r in rows] == ["a", "b\r\nc"] and [r.line for r in rows] == [1, 4]
    with gzip.open(tmp_path / "p.jsonl.gz", "wt") as fh:
        fh.write('{"prompt": "zipped"}\n')
    assert [r.messages[0]["content"] for r in PromptStream(tmp_path / "p.jsonl.gz")] == ["zipped"]
    (tmp_path / "alpaca_data.json").write_text(json.dumps([{"instruction": "x", "input": "y", "output": "z"}], indent=2))
    assert [r.messages[0]["content"] for r in PromptStream(tmp_path / "alpaca_data.json")] == ["x\n\ny"]
    (tmp_path / "broken.json").write_text('[{"instruction": "x"},')
    with pytest.raises(UserError, match="not valid JSON .*one JSON array of objects"):
        list(PromptStream(tmp_path / "broken.json"))
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "a"}\n' * 100)[:40])
    with pytest.raises(UserError, match="cannot read .*cut.jsonl.gz"):
        list(PromptStream(tmp_path / "cut.jsonl.gz"))


def test_ids_are_content_hashes_and_stable(tmp_path):
    p = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    ids1 = [r.id for r in PromptStream(p)]
    p2 = _write_jsonl(tmp_path / "q.jsonl", [{"prompt": "b"}, {"instruction": "a", "other": 1}])
    ids2 = [r.id for r in PromptStream(p2)]
    assert ids1 == ids2[::-1]
    assert ids1[0] == content_id([{"role": "user", "content": "a"}])


def test_one_row_id_rule_keep_ids(tmp_path):
    """`moaa sample` keeps the rows' own ids (the pipeline's prompts.jsonl carries the pipeline's ids), and
    hashes a row without one by the same rule as the pipeline; the pipeline's own ids never change."""
    rows = [{"id": "q1", "prompt": "a"}, {"prompt": "b"}, {"prompt_id": "u9", "prompt": "c"}]
    p = _write_jsonl(tmp_path / "p.jsonl", rows)
    assert [r.id for r in PromptStream(p, keep_ids=True)] == [
        "q1", content_id([{"role": "user", "content": "b"}]), "u9"]
    assert [r.id for r in PromptStream(p)] == [content_id([{"role": "user", "content": x}]) for x in "abc"]


def test_field_mapping(tmp_path):
    p = _write_jsonl(tmp_path / "p.jsonl", [{"q": "what?", "qid": "x1", "sys": "be brief"}])
    ps = PromptStream(p, mapping=parse_mapping(["prompt=q", "id=qid", "system=sys"]))
    rows = list(ps)
    assert rows[0].id == "x1"
    assert rows[0].messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what?"}]
    with pytest.raises(UserError, match="KEY=FIELD"):
        parse_mapping(["nonsense"])


def _bad_file(tmp_path):
    return _write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "fine"},                                   # line 1
        '{"prompt": "broken',                                 # line 2: not JSON
        {"text": "no known field"},                           # line 3: missing field
        {"prompt": "fine"},                                   # line 4: duplicate of line 1
        {"messages": [{"role": "user", "content": ""}]},      # line 5: empty turn
        {"messages": [{"role": "bot", "content": "x"}]},      # line 6: bad role
        {"prompt": "also fine"},                              # line 7
    ])


def test_invalid_rows_give_one_readable_error(tmp_path):
    with pytest.raises(UserError) as err:
        list(PromptStream(_bad_file(tmp_path)))
    msg = str(err.value)
    assert "\n" not in msg
    for needle in ("5 invalid row(s)", "line 2: not valid JSON", "line 3: missing prompt field",
                   "line 4: duplicate id", "same as line 1", "line 5", "--skip-invalid"):
        assert needle in msg, needle


def test_skip_invalid_counts_with_line_numbers(tmp_path):
    ps = PromptStream(_bad_file(tmp_path), skip_invalid=True)
    rows = list(ps)
    assert [r.line for r in rows] == [1, 7]
    assert [ln for ln, _ in ps.skipped] == [2, 3, 4, 5, 6]
    assert ps.summary().startswith("skipped 5 invalid row(s): line 2 (not valid JSON")


def test_duplicate_source_ids_with_mapping(tmp_path):
    p = _write_jsonl(tmp_path / "p.jsonl", [{"q": "a", "k": 1}, {"q": "b", "k": 1}])
    with pytest.raises(UserError, match="line 2: duplicate id 1"):
        list(PromptStream(p, mapping={"prompt": "q", "id": "k"}))


def test_parquet_and_datasets_folder(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": ["p one", "p two"]}), tmp_path / "p.parquet")
    assert [r.messages[0]["content"] for r in PromptStream(tmp_path / "p.parquet")] == ["p one", "p two"]
    ds = datasets.DatasetDict({"train_sft": datasets.Dataset.from_dict({
        "prompt": ["hi"], "messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]})})
    ds.save_to_disk(str(tmp_path / "uc"))
    with pytest.raises(UserError, match="--split"):
        list(PromptStream(tmp_path / "uc", split="nope"))
    ps = PromptStream(tmp_path / "uc")  # a single split is taken
    rows = list(ps)
    assert rows[0].messages == [{"role": "user", "content": "hi"}]


def test_missing_or_unknown_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        list(PromptStream(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unknown prompt format"):
        list(PromptStream(tmp_path / "x.csv"))
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(UserError, match="not UTF-8"):
        list(PromptStream(tmp_path / "bin.jsonl"))


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "moaa.cli.main", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_cli_bad_prompt_file_exits_2_with_one_line(tmp_path):
    bad = _bad_file(tmp_path)
    for cmd in (["pipeline", "check-prompts", "--prompts", str(bad)],
                ["pipeline", "run", "--prompts", str(bad), "--out", str(tmp_path / "run"), "--gateway", "127.0.0.1:1",
                 "--annotator", "127.0.0.1:1", "--target", "org/m"]):
        res = _cli(*cmd)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moaa: error: ") and "line 2: not valid JSON" in lines[0]
        assert "Traceback" not in res.stderr


def test_cli_skip_invalid_reports_count_and_lines(tmp_path):
    res = _cli("pipeline", "check-prompts", "--prompts", str(_bad_file(tmp_path)), "--skip-invalid")
    assert res.returncode == 0, res.stderr
    assert "2 prompts" in res.stdout and "skipped 5 invalid row(s): line 2 (not valid JSON" in res.stdout


def test_samples_rows_read_messages_as_the_prompt_loader_does():
    """`moaa annotate`, judge-eval and eval read a samples row's prompt with the loader's message rules."""
    from moaa.client.pairs import sample_prompt

    row = {"id": "x", "prompt": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                                 {"from": "human", "value": "Hi"}]}
    assert sample_prompt(row) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert sample_prompt({"id": "y", "prompt": "Hello"}) == [{"role": "user", "content": "Hello"}]
    with pytest.raises(UserError, match="row 'z': prompt\\[0\\] content has a 'image_url' part"):
        sample_prompt({"id": "z", "prompt": [{"role": "user", "content": [{"type": "image_url"}]}]}, "s.jsonl")
