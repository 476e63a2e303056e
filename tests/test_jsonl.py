"""The one resumable JSONL writer: torn tail cut, mid-file garbage refused, foreign files refused, rows
fsynced before a SIGKILL survive it."""
import json
import textwrap

import pytest

from moaa.errors import UserError
from moaa.jsonl import JsonlAppender, read_rows
from tests.fixtures.kill import sigkill_when


def test_append_and_resume(tmp_path):
    w = JsonlAppender(tmp_path / "out.jsonl")
    assert w.open() == []
    w.append({"text": "a", "id": "r1"})
    w.append({"id": "r2", "text": "é"})
    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith('{"id": "r1"')          # id first, whatever the caller's key order
    assert [r["id"] for r in JsonlAppender(tmp_path / "out.jsonl").open()] == ["r1", "r2"]
    with pytest.raises(ValueError):
        w.append({"text": "no id"})


def test_torn_tail_is_cut_and_redone(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "r1"}\n{"id": "r2", "prom')
    assert [r["id"] for r in read_rows(path)] == ["r1"]           # reading alone never changes the file
    assert path.read_text().endswith('"prom')
    w = JsonlAppender(path)
    assert [r["id"] for r in w.open()] == ["r1"]
    assert path.read_text() == '{"id": "r1"}\n'
    w.append({"id": "r2"})
    assert [r["id"] for r in read_rows(path)] == ["r1", "r2"]
    # a first row torn by a kill is ours too (it starts as every row we write starts)
    first = tmp_path / "first.jsonl"
    first.write_text('{"id": "r1", "te')
    assert JsonlAppender(first).open() == [] and first.read_text() == ""


def test_garbage_mid_file_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "out.jsonl"
    text = '{"id": "r1"}\nnot json\n{"id": "r3"}\n'
    path.write_text(text)
    with pytest.raises(UserError, match=r"out.jsonl:2: not JSON"):
        JsonlAppender(path).open()
    path.write_text('{"id": "r1"}\n{"id": "r2"}\n[1, 2]\n')       # a complete last line is not a torn one
    with pytest.raises(UserError, match=r"out.jsonl:3: not a row with 'id'"):
        JsonlAppender(path).open()
    assert path.read_text() == '{"id": "r1"}\n{"id": "r2"}\n[1, 2]\n'   # nothing was truncated


@pytest.mark.parametrize("content", ["hello world", "my notes\nmore", '{"name": "x"}\n{"id": 1}\n', "a,b,c\n1,2,3\n"])
def test_foreign_file_is_refused_untouched(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_text(content)
    with pytest.raises(UserError, match="is not a moaa JSONL file"):
        JsonlAppender(path).open()
    assert path.read_text() == content


def test_fsynced_rows_survive_sigkill(tmp_path):
    path = tmp_path / "out.jsonl"
    script = textwrap.dedent(f"""
        from moaa.jsonl import JsonlAppender
        w = JsonlAppender({str(path)!r})
        w.open()
        for i in range(100000):
            w.append({{"id": f"r{{i}}", "text": "x" * 3000}})
            if i == 50:
                print("half", flush=True)
    """)
    sigkill_when(script)
    w = JsonlAppender(path)
    rows = w.open()
    ids = [r["id"] for r in rows]
    assert len(ids) >= 51 and ids == [f"r{i}" for i in range(len(ids))]
    for i in range(len(ids), len(ids) + 3):
        w.append({"id": f"r{i}"})
    again = [json.loads(x)["id"] for x in path.read_text().splitlines()]
    assert again == [f"r{i}" for i in range(len(ids) + 3)]


def test_short_write_is_an_error_and_its_partial_line_is_cut(tmp_path):
    """A disk that fills mid-row (here: a file-size limit) gives a short write: an error, never a torn line
    buried mid-file by the next append; the next open cuts the partial tail."""
    import subprocess
    import sys

    path = tmp_path / "out.jsonl"
    script = textwrap.dedent(f"""
        import resource, signal
        from moaa.errors import TransientError
        from moaa.jsonl import JsonlAppender
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
        w = JsonlAppender({str(path)!r})
        w.open()
        try:
            for i in range(100):
                w.append({{"id": f"r{{i}}", "text": "x" * 90}})
        except TransientError as err:
            print(i, err)
        try:
            w.append({{"id": "after"}})
        except TransientError as err:
            print("refused:", err)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60).stdout
    first, second = out.splitlines()
    assert "short write" in first and second.startswith("refused:")
    assert not path.read_bytes().endswith(b"\n")                      # the partial row is the tail ...
    rows = JsonlAppender(path).open()                                  # ... and is cut on the next open
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(int(first.split()[0]))]
    assert path.read_bytes().endswith(b"\n")


def test_standard_input_only_where_the_caller_reads_once(tmp_path, monkeypatch):
    """"-" is standard input only for callers that opt in (they read their input once); for the others it is
    still a file name, so a reader that reads twice never finds its input gone."""
    import io
    import sys

    from moaa.jsonl import read_input

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'\xef\xbb\xbf{"id": "a"}\n\n{"id": "b"}\n')))
    assert read_input("-", "samples", stdin=True) == [(1, {"id": "a"}), (3, {"id": "b"})]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="^items file - does not exist$"):
        read_input("-", "items")
