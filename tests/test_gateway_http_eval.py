"""`moaa eval --contestant NAME=URL#model`: the gateway's OpenAI-compatible door (a recipe as the model)
answers the baseline's prompts, and the judge compares those answers with the baseline's."""
from __future__ import annotations

import json

from tests.fixtures.gateway import moa_config
from tests.fixtures.cli import run_moaa as _cli


def _baseline(tmp_path):
    path = tmp_path / "base.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}?", "answer": "ok"}) + "\n"
                            for i in range(6)))
    return path


async def test_eval_judges_the_gateway_http_door_as_a_contestant(gw_emulators, gateway_factory, judge_emulator,
                                                                  tmp_path):
    emu = await gw_emulators({"a": {}, "b": {}, "agg": {}})  # 16-word answers: longer than "ok"
    gw = await gateway_factory(moa_config(emu.url, ["a", "b"]))
    url = f"http://127.0.0.1:{gw.running.http_port}/v1"
    base = _baseline(tmp_path)
    args = ["eval", "--contestant", f"moa={url}#moa", "--baseline", str(base), "--baseline-name", "plain",
            "--judge-url", judge_emulator.url, "--judge-model", "longest", "--out", str(tmp_path / "ev"),
            "--bootstrap", "100"]
    rc, out, err = await _cli(*args)
    assert rc == 0, err
    wr = json.loads((tmp_path / "ev" / "winrates.json").read_text())[0]
    assert wr["model"] == "moa" and wr["baseline"] == "plain" and wr["n"] == 6 and wr["win_rate"] == 100.0
    rows = [json.loads(x) for x in (tmp_path / "ev" / "answers-moa").glob("*.jsonl").__next__().read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == [f"q{i}" for i in range(6)] and all(r["answer"] for r in rows)
    assert len(emu.bodies("agg")) == 6
    # resumable: the answers are kept, a second run asks the endpoint nothing
    rc, out2, err = await _cli(*args)
    assert rc == 0 and out2 == out and len(emu.bodies("agg")) == 6


async def test_eval_contestant_errors(gw_emulators, gateway_factory, tmp_path):
    base = _baseline(tmp_path)
    rc, _, err = await _cli("eval", "--contestant", "no-url", "--baseline", str(base), "--judge-url",
                            "http://127.0.0.1:9/v1", "--judge-model", "x")
    assert rc == 2 and "write NAME=URL#model" in err and len(err.strip().splitlines()) == 1
    rc, _, err = await _cli("eval", "--baseline", str(base), "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "x")
    assert rc == 2 and "--answers FILE or --contestant" in err
    # a model the endpoint does not serve: every answer fails, is recorded, and the run says to retry
    emu = await gw_emulators({"a": {}, "agg": {}})
    gw = await gateway_factory(moa_config(emu.url, ["a"]))
    rc, _, err = await _cli("eval", "--contestant", f"x=http://127.0.0.1:{gw.running.http_port}/v1#nope",
                            "--baseline", str(base), "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "x",
                            "--out", str(tmp_path / "ev2"))
    assert rc != 0 and "6 answers of x failed" in err and "does not exist" in err, err
