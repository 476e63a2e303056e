"""Dataset store: sharding, exactly-once append and resume, torn lines, manifest; token ledger."""
import json
import textwrap

import pytest

from moaa.errors import UserError
from moaa.pipeline.budget import BudgetExhausted, TokenLedger
from moaa.files import read_json
from moaa.pipeline.store import DatasetStore
from tests.fixtures.kill import sigkill_when


def _ids(store):
    return [r["id"] for r in store.iter_rows()]


def test_write_shards_and_manifest(tmp_path):
    st = DatasetStore(tmp_path / "d", stage="sft_data", fmt="sft", config_hash="abc", shard_rows=3).open()
    for i in range(7):
        assert st.write({"id": f"r{i}", "messages": []}, models=["m1"])
    assert not st.write({"id": "r3", "messages": []})          # already there
    st.skip("s1", "low_margin: 0.1")
    st.fail("f1", "UNAVAILABLE: backend down")
    m = st.write_manifest(complete=False, note="x")
    assert [p.name for p in st.shards()] == ["data-00000.jsonl", "data-00001.jsonl", "data-00002.jsonl"]
    assert m["rows"] == 7 and m["skipped"] == 1 and m["failed"] == 1 and m["models"] == ["m1"]
    assert m["skipped_reasons"] == {"low_margin": 1} and m["config_hash"] == "abc" and not m["complete"]
    assert read_json(tmp_path / "d" / "manifest.json")["extra"]["note"] == "x"


def test_resume_is_exactly_once(tmp_path):
    st = DatasetStore(tmp_path / "d", stage="s", fmt="sft", shard_rows=2).open()
    for i in range(3):
        st.write({"id": f"r{i}"})
    st.skip("s0", "why")
    st.fail("r9", "boom")
    st.write_manifest()
    st2 = DatasetStore(tmp_path / "d", stage="s", fmt="sft", shard_rows=2).open()
    assert st2.is_done("r1") and st2.is_done("s0") and not st2.is_done("r9") and "r9" in st2.failed
    for i in range(6):
        st2.write({"id": f"r{i}"})
    st2.write({"id": "r9"})
    ids = _ids(st2)
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 7
    assert not st2.failed  # r9 written: no longer failed
    st3 = DatasetStore(tmp_path / "d", stage="s", fmt="sft", shard_rows=2).open()
    assert st3.rows == 7 and not st3.failed


def test_torn_last_line_is_cut(tmp_path):
    st = DatasetStore(tmp_path / "d", stage="s", fmt="sft").open()
    st.write({"id": "a"})
    with open(tmp_path / "d" / "data-00000.jsonl", "a") as fh:
        fh.write('{"id": "b", "messages": [{"ro')               # killed mid-write
    st2 = DatasetStore(tmp_path / "d", stage="s", fmt="sft").open()
    assert "a" in st2.done and "b" not in st2.done and len(st2.done) == 1
    st2.write({"id": "b"})
    assert _ids(st2) == ["a", "b"]


def test_config_hash_mismatch_is_a_user_error(tmp_path):
    st = DatasetStore(tmp_path / "d", stage="s", fmt="sft", config_hash="one").open()
    st.write_manifest()
    with pytest.raises(UserError, match="another configuration"):
        DatasetStore(tmp_path / "d", stage="s", fmt="sft", config_hash="two").open()


def test_sigkill_while_writing_then_resume(tmp_path):
    """A real writer process is killed with SIGKILL mid-run; the resumed run writes every id exactly once."""
    folder = tmp_path / "d"
    script = textwrap.dedent(f"""
        import sys, time
        from moaa.pipeline.store import DatasetStore
        st = DatasetStore({str(folder)!r}, stage="s", fmt="sft", shard_rows=50).open()
        for i in range(400):
            if st.write({{"id": f"r{{i}}", "messages": [{{"role": "user", "content": "x" * 2000}}]}}):
                if i == 100:
                    print("half", flush=True)
    """)
    sigkill_when(script)
    st = DatasetStore(folder, stage="s", fmt="sft", shard_rows=50).open()
    before = st.rows
    assert 100 <= before < 400
    for i in range(400):
        st.write({"id": f"r{i}", "messages": []})
    ids = _ids(st)
    assert len(ids) == 400 and set(ids) == {f"r{i}" for i in range(400)}


def test_token_ledger_and_budget(tmp_path):
    path = tmp_path / "usage.json"
    led = TokenLedger(path, budget=100)
    led.add("sft_data", "smol-a", {"prompt_tokens": 30, "completion_tokens": 20})
    led.add("sft_data", "smol-b", {"prompt_tokens": 10, "completion_tokens": 5})
    led.add("pairs", "judge", {"prompt_tokens": 20, "completion_tokens": 0}, requests=2)
    assert led.total == 85 and led.stage_total("sft_data") == 65 and not led.exhausted()
    led.check("stage 1")
    led.save()
    again = TokenLedger(path, budget=100)          # survives a restart
    assert again.total == 85 and again.per_model()["judge"]["requests"] == 2
    again.add("pairs", "judge", {"prompt_tokens": 15, "completion_tokens": 0})
    with pytest.raises(BudgetExhausted, match="re-run with a larger --token-budget") as err:
        again.check("stage 2")
    assert err.value.exit_code == 3
    assert json.loads(path.read_text())["total_tokens"] == 100
    assert TokenLedger(None, budget=None).short() == "0 tok"
