"""`moaa annotate` and `moaa judge-eval` as real subprocesses against a real annotator server."""
import asyncio
import json
import sys

import grpc
import pytest

from moaa.v1 import annotator_pb2, annotator_pb2_grpc
from tests.fixtures.annotator import judge_config
from tests.fixtures.cli import run_moaa as moaa

GOOD = "Paris is the capital of France."
BAD = "Bananas are yellow."


def _samples(path, ids):
    with path.open("w") as fh:
        for i in ids:
            cands = [{"text": BAD, "model": "sft"}, {"text": GOOD, "model": "sft"}]
            if i == "same":
                cands = [{"text": BAD, "model": "sft"}, {"text": BAD + " ", "model": "sft"}]
            if i == "one":
                cands = cands[:1]
            if i == "dup":  # the annotator refuses repeated candidate ids: INVALID_ARGUMENT, not retried
                cands = [{"id": "x", **cands[0]}, {"id": "x", **cands[1]}]
            fh.write(json.dumps({"id": i, "prompt": [{"role": "user", "content": "Capital of France?"}],
                                 "candidates": cands}) + "\n")


async def test_annotate_writes_trl_rows_and_resumes(tmp_path, judge_emulator, annotator_factory):
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris", "b": "keyword:capital"},
                                                mode="pointwise", combine="mean"))
    inp, out = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
    _samples(inp, ["r1", "r2", "same", "one", "dup"])
    rc, _, err = await moaa("annotate", "--annotator", stub.server.address, "--in", str(inp), "--out", str(out),
                            "--no-progress")
    assert rc == 0, err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["r1", "r2"] or sorted(r["id"] for r in rows) == ["r1", "r2"]
    row = rows[0]
    assert row["prompt"] == [{"role": "user", "content": "Capital of France?"}]
    assert row["chosen"] == [{"role": "assistant", "content": GOOD}]
    assert row["rejected"] == [{"role": "assistant", "content": BAD}]
    ann = row["annotation"]
    assert ann["score_chosen"] > ann["score_rejected"] and {j["judge"] for j in ann["judges"]} == {"a", "b"}
    assert ann["agreement"] == 1.0 and ann["chosen_model"] == "sft"
    # the row the README shows (its one json block) has exactly these fields, at every level
    from tests.test_readme import code_blocks

    (shown,) = [json.loads(block) for block in code_blocks("json")]
    assert set(shown) == set(row) and set(shown["annotation"]) == set(ann)
    assert set(shown["annotation"]["judges"][0]) == set(ann["judges"][0])
    skipped = {json.loads(x)["id"]: json.loads(x)["reason"] for x in (tmp_path / "pairs.jsonl.skipped.jsonl").open()}
    # equal (after strip) or single answers are not sent: the same rule as the pipeline's pairs stage
    assert skipped["same"].startswith("too_few_candidates") and skipped["one"].startswith("too_few_candidates")
    rejected = [json.loads(x) for x in (tmp_path / "pairs.jsonl.rejected.jsonl").open()]
    assert [(r["id"], r["stage"]) for r in rejected] == [("dup", "annotate")]
    assert rejected[0]["reason"].startswith("INVALID_ARGUMENT") and "dup" not in skipped
    report = json.loads((tmp_path / "pairs.jsonl.report.json").read_text())
    assert report["pairs"] == 2 and report["skipped"] == 2 and report["rejected"] == 1
    assert set(report["judges"]) == {"a", "b"}

    # a killed run left a torn line; new rows arrive: only the missing ones are annotated, each once
    with out.open("a") as fh:
        fh.write('{"id": "r3", "prompt": [')
    _samples(inp, ["r1", "r2", "same", "one", "dup", "r3", "r4"])
    judge_emulator.reset()
    rc, _, err = await moaa("annotate", "--annotator", stub.server.address, "--in", str(inp), "--out", str(out),
                            "--no-progress")
    assert rc == 0, err
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert sorted(ids) == ["r1", "r2", "r3", "r4"]
    assert judge_emulator.stats.requests == 4   # 2 rows x 2 judges
    assert "2 pairs written" in err and "4 already done" in err, err
    report = json.loads((tmp_path / "pairs.jsonl.report.json").read_text())
    assert report["pairs"] == 2 and {j["rows"] for j in report["judges"].values()} == {4}   # every row of --out
    # the rejected row is not resent, and every run names it again: the user has to fix it
    assert "1 prompts rejected: INVALID_ARGUMENT" in err and "pairs.jsonl.rejected.jsonl" in err
    # a repeated id is refused on a resume as on a first run, whatever became of its first row (written,
    # skipped, rejected): never counted "already done" and dropped
    for again in ("r1", "same", "dup"):
        _samples(inp, ["r1", "r2", "same", "one", "dup", "r3", "r4", again])
        rc, _, err = await moaa("annotate", "--annotator", stub.server.address, "--in", str(inp), "--out", str(out),
                                "--no-progress")
        assert rc == 2 and f"samples.jsonl:8: row id {again!r} appears twice" in err, err


async def test_a_flag_typo_on_a_resume_fails_the_run_and_its_rejections_are_resent(tmp_path, judge_emulator,
                                                                                     annotator_factory):
    """A resumed run whose every row is refused (an --ensemble the annotator does not know) exits 2, as a first
    run does; those rows were rejected under that flag, so a run with the right one sends them."""
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris", "b": "keyword:capital"},
                                                mode="pointwise", combine="mean"))
    inp, out = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
    args = ("annotate", "--annotator", stub.server.address, "--in", str(inp), "--out", str(out), "--no-progress")
    _samples(inp, ["r1", "r2"])
    assert (await moaa(*args))[0] == 0
    _samples(inp, ["r1", "r2", "r3", "r4"])
    rc, _, err = await moaa(*args, "--ensemble", "typo")
    assert rc == 2 and "every row sent was rejected" in err and "unknown ensemble 'typo'" in err, err
    rejected = [json.loads(x) for x in (tmp_path / "pairs.jsonl.rejected.jsonl").open()]
    assert [(r["id"], r["ensemble"]) for r in rejected] == [("r3", "typo"), ("r4", "typo")]
    rc, _, err = await moaa(*args)
    assert rc == 0 and "2 pairs written, 0 skipped, 2 already done" in err and "rejected" not in err, err
    assert sorted(json.loads(x)["id"] for x in out.open()) == ["r1", "r2", "r3", "r4"]
    assert (tmp_path / "pairs.jsonl.rejected.jsonl").read_text() == ""


async def test_annotate_and_judge_eval_read_standard_input(tmp_path, judge_emulator, annotator_factory):
    """`--in -` reads the rows from standard input (read once, as a file is); a rerun resumes by the ids in --out,
    so piping the same rows again (here with one more) annotates only what is missing."""
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris", "b": "keyword:capital"},
                                                mode="pointwise", combine="mean"))
    inp, out = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
    _samples(inp, ["r1", "r2"])
    args = ("annotate", "--annotator", stub.server.address, "--in", "-", "--out", str(out), "--no-progress")
    rc, _, err = await moaa(*args, stdin=inp.read_bytes())
    assert rc == 0, err
    assert sorted(json.loads(x)["id"] for x in out.read_text().splitlines()) == ["r1", "r2"]
    _samples(inp, ["r1", "r2", "r3"])
    judge_emulator.reset()
    rc, _, err = await moaa(*args, stdin=inp.read_bytes())
    assert rc == 0 and "1 pairs written" in err and "2 already done" in err, err
    assert judge_emulator.stats.requests == 2   # r3 only, 2 judges
    rc, _, err = await moaa(*args, stdin=inp.read_bytes() + b"not json\n")
    assert rc == 2 and "-:4: not JSON" in err and len(err.strip().splitlines()) == 1

    labelled = json.dumps({"id": "l0", "prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."})
    rc, stdout, err = await moaa("judge-eval", "--annotator", stub.server.address, "--in", "-", "--no-progress",
                                 stdin=(labelled + "\n").encode())
    assert rc == 0 and "(ensemble)" in stdout, err


async def test_a_client_pointed_at_the_wrong_service_exits_2_at_once(tmp_path, judge_emulator, annotator_factory):
    """The gateway's command at the annotator's port (or the other way round) is UNIMPLEMENTED: a retry asks the
    same server again, so exit 2 with the port to check, not 75 'rerun to resume'."""
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris"}, mode="pointwise"))
    rc, _, err = await moaa("generate", "--gateway", stub.server.address, "Hi")
    assert rc == 2 and "UNIMPLEMENTED" in err and "is it the right port?" in err, err


class _AnswersOnePerCall(annotator_pb2_grpc.AnnotatorServicer):
    """A server that ends each AnnotateStream as if done after answering one item (or none): a client must not
    take the end for the answers it did not get."""

    def __init__(self, per_call: int):
        self.per_call, self.calls = per_call, 0

    async def AnnotateStream(self, request_iterator, context):
        self.calls += 1
        answered = 0
        async for req in request_iterator:
            if answered == self.per_call:
                return
            answered += 1
            yield annotator_pb2.AnnotateResult(id=req.id, response=annotator_pb2.AnnotateResponse(
                id=req.id, chosen_id=req.candidates[0].id, rejected_id=req.candidates[1].id, margin=1.0))


@pytest.mark.parametrize("per_call", [1, 0])
async def test_a_stream_that_ends_with_rows_unanswered_loses_none(tmp_path, per_call):
    """Each call answers one row and ends cleanly: the client asks again for the rest, so all 3 rows are written.
    A server that answers none: exit 75 after the bounded retries, never exit 0 with rows missing."""
    servicer = _AnswersOnePerCall(per_call)
    server = grpc.aio.server()
    annotator_pb2_grpc.add_AnnotatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        inp, out = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
        _samples(inp, ["r1", "r2", "r3"])
        rc, _, err = await moaa("annotate", "--annotator", f"127.0.0.1:{port}", "--in", str(inp), "--out", str(out),
                                "--no-progress")
    finally:
        await server.stop(0)
    if per_call:
        assert rc == 0 and sorted(json.loads(x)["id"] for x in out.open()) == ["r1", "r2", "r3"], err
        assert servicer.calls == 3
    else:
        # (or gRPC core reports the client's write racing the server's end as INTERNAL: not retried, also 75)
        assert rc == 75 and ("the stream ended with 3 items unanswered, 4 times" in err or "3 rows left" in err), err
        assert not out.exists() or out.read_text() == ""


async def test_annotate_bad_input_and_unreachable(tmp_path):
    inp = tmp_path / "s.jsonl"
    inp.write_text('{"id": "x", "prompt": "hi", "candidates": [{"text": "a"}, {"text": "b"}]}\nnot json\n')
    rc, _, err = await moaa("annotate", "--annotator", "127.0.0.1:9", "--in", str(inp), "--out", str(tmp_path / "o"))
    assert rc == 2 and "s.jsonl:2: not JSON" in err and "Traceback" not in err
    inp.write_text('{"id": "x", "prompt": "hi", "candidates": [{"text": "a"}, {"text": "b"}]}\n')
    rc, _, err = await moaa("annotate", "--annotator", "127.0.0.1:9", "--in", str(inp), "--out", str(tmp_path / "o"),
                            "--no-progress")
    assert rc == 75 and "UNAVAILABLE" in err and "rerun to resume" in err

    # an --out that is not one of our files is refused, not truncated
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my notes\nmore notes")
    rc, _, err = await moaa("annotate", "--annotator", "127.0.0.1:9", "--in", str(inp), "--out", str(foreign),
                            "--no-progress")
    assert rc == 2 and "is not a moaa JSONL file" in err and "Traceback" not in err
    assert foreign.read_text() == "my notes\nmore notes"
    # --out mistyped as the input, or as another file of rows with ids: an error, not "1 already done"
    samples = inp.read_text()
    rc, _, err = await moaa("annotate", "--annotator", "127.0.0.1:9", "--in", str(inp), "--out", str(inp))
    assert rc == 2 and "is the input file" in err and inp.read_text() == samples, err
    (tmp_path / "copy.jsonl").write_text(samples)
    rc, _, err = await moaa("annotate", "--annotator", "127.0.0.1:9", "--in", str(inp), "--out",
                            str(tmp_path / "copy.jsonl"))
    assert rc == 2 and "row 'x' is not a moaa preference row (missing chosen, rejected" in err, err
    inp.write_text("\n\n")   # an empty input: most likely the wrong file
    rc, _, err = await moaa("annotate", "--annotator", "127.0.0.1:9", "--in", str(inp), "--out", str(tmp_path / "o3"))
    assert rc == 2 and "no rows to annotate" in err, err
    # an id that is null or an object is a broken row, not the id "None"
    inp.write_text('{"id": null, "prompt": "hi", "candidates": [{"text": "a"}, {"text": "b"}]}\n')
    rc, _, err = await moaa("annotate", "--annotator", "127.0.0.1:9", "--in", str(inp), "--out", str(tmp_path / "o2"))
    assert rc == 2 and "s.jsonl:1: row id None is not a string or an integer" in err, err
    # answers under a misspelt key, as a string or as numbers: an error naming the row, not a quality skip that a
    # rerun with the fixed file would count as done
    for cands, needle in (('[{"txt": "a"}, {"txt": "b"}]', "candidates[0] is no answer"),
                          ('"one answer"', "'candidates' is str: give a list of answers"),
                          ('[5, null]', "candidates[0] is no answer")):
        inp.write_text('{"id": "r", "prompt": "hi", "candidates": %s}\n' % cands)
        rc, _, err = await moaa("annotate", "--annotator", "127.0.0.1:9", "--in", str(inp), "--out", str(tmp_path / "o4"))
        assert rc == 2 and f"s.jsonl:1: row 'r': {needle}" in err, err
        assert not (tmp_path / "o4.skipped.jsonl").exists()
    inp.write_text('{"id": "r", "prompt": "hi", "answer": "one"}\n')
    rc, _, err = await moaa("annotate", "--annotator", "127.0.0.1:9", "--in", str(inp), "--out", str(tmp_path / "o4"))
    assert rc == 2 and "row 'r': no answers: give them as 'candidates'" in err, err


async def test_judge_eval_reports_ensemble_and_each_judge(tmp_path, judge_emulator, annotator_factory):
    """Per judge: accuracy over the calls it decided; a judge that never gives a readable verdict has none
    (its abstentions are counted apart, never as ties), and a judge whose backend is down is named under the
    table with the calls decided without it (the ensemble's min_judges let the others decide)."""
    cfg = judge_config(
        judge_emulator.url, {"fair": "keyword:paris", "biased": "first", "contrarian": "longest", "mute": "garbage",
                             "down": "keyword:paris"},
        mode="pairwise", combine="mean", min_margin=0.0, min_judges=4, max_abstain_fraction=0.9)
    cfg["backends"]["m-down"].update(urls=["http://127.0.0.1:9/v1"], retries={"max_attempts": 1})
    stub = await annotator_factory(cfg)
    labelled = tmp_path / "labelled.jsonl"
    with labelled.open("w") as fh:
        for i in range(3):
            fh.write(json.dumps({"id": f"l{i}", "prompt": [{"role": "user", "content": "Capital of France?"}],
                                 "chosen": [{"role": "assistant", "content": "Paris."}],
                                 "rejected": [{"role": "assistant", "content": "It is Lyon, a big French city."}]}) + "\n")
    rc, out, err = await moaa("judge-eval", "--annotator", stub.server.address, "--in", str(labelled),
                              "--out", str(tmp_path / "new" / "eval.json"), "--no-progress")
    assert rc == 0, err   # its folder made before the judging (it was a FileNotFoundError after it)
    summary = json.loads((tmp_path / "new" / "eval.json").read_text())
    judges = summary["judges"]
    assert summary["rows"] == 3
    assert judges["fair"]["accuracy"] == 1.0 and judges["fair"]["consistent"] == 1.0
    assert judges["fair"]["by_order"] == {"chosen_first": 1.0, "rejected_first": 1.0}
    assert judges["contrarian"]["accuracy"] == 0.0
    # always prefers the first shown; asked in both orders it cancels out to a tie, whatever the input order
    assert judges["biased"]["ties"] == 6 and judges["biased"]["abstained"] == 0 and judges["biased"]["consistent"] == 1.0
    assert judges["mute"] == {"accuracy": None, "agree": 0, "disagree": 0, "ties": 0, "abstained": 6,
                              "consistent": None, "by_order": {"chosen_first": None, "rejected_first": None}}
    assert "down" not in judges and summary["judge_failures"] == {"m-down": 6}
    assert "(ensemble)" in judges and "(ensemble)" in out and "fair" in out
    assert "decided without a judge whose backend failed" in out and "m-down in 6 calls" in out, out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("mute")] == [["mute", "-"]]


async def test_annotator_serve_command_serves_and_stops_on_sigterm(tmp_path, judge_emulator):
    import signal
    import socket

    import grpc
    import yaml

    from moaa.v1 import annotator_pb2_grpc
    from tests.fixtures.annotator import request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = judge_config(judge_emulator.url, {"a": "keyword:paris"}, mode="pointwise", combine="mean")
    cfg["annotator"]["port"] = port
    path = tmp_path / "moaa.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "moaa.cli.main", "annotator", "serve",
                                                "--config", str(path), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await asyncio.wait_for(ch.channel_ready(), 60)
            resp = await annotator_pb2_grpc.AnnotatorStub(ch).Annotate(request([GOOD, BAD]), timeout=30)
        assert resp.chosen_id == "c0"
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
    assert proc.returncode == 0

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**cfg, "ensembles": {"e": {"judges": [{"name": "a", "model": "m-a",
                                                                          "template": "nope_v9"}]}}}))
    rc, _, err = await moaa("annotator", "serve", "--config", str(bad))
    assert rc == 2 and "unknown judge template 'nope_v9'" in err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_annotate_retries_an_annotator_that_is_down_or_restarts(tmp_path, judge_emulator):
    """UNAVAILABLE is retried a bounded number of times: an annotator that comes up a moment late, or is
    restarted mid-run, costs no row and no duplicate; one that stays down fails in bounded time."""
    from moaa.services.annotator.server import start_annotator
    from moaa.services.config import parse_config

    port = _free_port()
    cfg = parse_config(judge_config(judge_emulator.url, {"a": "longest+delay=0.05", "b": "longest+delay=0.05"},
                                    mode="pointwise", combine="mean", min_margin=0.0))
    inp, out = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
    with inp.open("w") as fh:
        for i in range(60):
            fh.write(json.dumps({"id": f"r{i}", "prompt": f"Question {i}?",
                                 "candidates": ["short", f"a longer answer {i}", f"the longest answer of all {i}"]}) + "\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "moaa.cli.main", "annotate", "--annotator", f"127.0.0.1:{port}", "--in", str(inp),
        "--out", str(out), "--no-progress", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    servers = []
    try:
        await asyncio.sleep(1.0)  # the command's first call finds nothing listening
        servers.append(await start_annotator(cfg, port=port, probes=False))
        for _ in range(600):  # restart it once some rows are written
            if out.exists() and len(out.read_bytes().splitlines()) >= 5:
                break
            await asyncio.sleep(0.02)
        await servers[0].stop(0)
        servers.append(await start_annotator(cfg, port=port, probes=False))
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        for s in servers:
            await s.stop(0)
    assert proc.returncode == 0, stderr.decode()
    assert stderr.decode().strip().splitlines() == ["60 pairs written, 0 skipped, 0 already done; "
                                                    f"report: {out}.report.json"]   # the failed call left nothing behind
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"r{i}" for i in range(60))   # every row exactly once

    t0 = asyncio.get_running_loop().time()
    rc, _, err = await moaa("annotate", "--annotator", f"127.0.0.1:{_free_port()}", "--in", str(inp),
                            "--out", str(tmp_path / "other.jsonl"), "--no-progress")
    assert rc == 75 and "UNAVAILABLE" in err and "4 tries over 3.5 s" in err and len(err.strip().splitlines()) == 1
    assert asyncio.get_running_loop().time() - t0 < 30


async def test_annotate_and_judge_eval_reach_a_mutual_tls_annotator(tmp_path, judge_emulator, annotator_factory,
                                                                    gw_tls_files, monkeypatch):
    """The client flags are the same on every command: --tls-ca, --tls-cert/--tls-key, --token or $MOAA_TOKEN."""
    monkeypatch.setenv("MOAA_TEST_ANN_TOKENS", "good")
    tls = {"cert_file": gw_tls_files["server.crt"], "key_file": gw_tls_files["server.key"],
           "client_ca_file": gw_tls_files["ca.crt"]}
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris"}, mode="pointwise",
                                                combine="mean", annotator={"tls": tls,
                                                                           "auth": {"tokens_env": "MOAA_TEST_ANN_TOKENS"}}))
    inp, out = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
    _samples(inp, ["r1"])
    mtls = ("--annotator", stub.server.address, "--tls-ca", gw_tls_files["ca.crt"], "--tls-cert",
            gw_tls_files["client.crt"], "--tls-key", gw_tls_files["client.key"], "--no-progress")
    rc, _, err = await moaa("annotate", "--in", str(inp), "--out", str(out), "--token", "good", *mtls)
    assert rc == 0, err
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["r1"]
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text(json.dumps({"id": "l0", "prompt": "Capital of France?", "chosen": GOOD, "rejected": BAD}) + "\n")
    monkeypatch.setenv("MOAA_TOKEN", "good")
    rc, stdout, err = await moaa("judge-eval", "--in", str(labelled), *mtls)
    assert rc == 0 and "1 labelled rows" in stdout, err
    rc, _, err = await moaa("judge-eval", "--in", str(labelled), *mtls, "--token", "bad")
    assert rc == 2 and "UNAUTHENTICATED" in err and len(err.strip().splitlines()) == 1   # not retried
    # a CA that did not sign the server's certificate is refused at once, with what to change (one line)
    wrong_ca = tuple(gw_tls_files["named.crt"] if a == gw_tls_files["ca.crt"] else a for a in mtls)
    rc, _, err = await moaa("annotate", "--in", str(inp), "--out", str(tmp_path / "p2.jsonl"), *wrong_ca)
    assert rc == 2 and "CERTIFICATE_VERIFY_FAILED" in err and "--tls-ca must be" in err, err
    assert "tries" not in err and len(err.strip().splitlines()) == 1


async def test_judge_eval_failed_calls_are_an_error_and_a_foreign_out_is_kept(tmp_path, judge_emulator,
                                                                               annotator_factory):
    """A judge whose backend is down makes every item UNAVAILABLE: transient (exit 75), never a silent
    skip; --out that is not a judge-eval summary is refused before any call and left as it was."""
    cfg = judge_config(judge_emulator.url, {"a": "keyword:paris", "b": "keyword:paris"}, mode="pointwise",
                       combine="mean")
    cfg["backends"]["m-b"].update(urls=["http://127.0.0.1:9/v1"], retries={"max_attempts": 1})
    stub = await annotator_factory(cfg)
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text(json.dumps({"id": "l0", "prompt": "Capital of France?", "chosen": GOOD, "rejected": BAD}) + "\n")
    rc, _, err = await moaa("judge-eval", "--annotator", stub.server.address, "--in", str(labelled), "--no-progress")
    assert rc == 75 and "UNAVAILABLE" in err and "rerun" in err and len(err.strip().splitlines()) == 1

    # moaa annotate: the failed rows are counted beside what was done, in its one line
    inp = tmp_path / "samples.jsonl"
    _samples(inp, ["r1", "one"])
    rc, _, err = await moaa("annotate", "--annotator", stub.server.address, "--in", str(inp), "--out",
                            str(tmp_path / "pairs.jsonl"), "--no-progress")
    assert rc == 75 and len(err.strip().splitlines()) == 1, err
    assert "0 pairs written, 1 skipped, 0 already done; 1 rows failed" in err

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    rc, _, err = await moaa("judge-eval", "--annotator", "127.0.0.1:9", "--in", str(labelled), "--out", str(notes),
                            "--no-progress")
    assert rc == 2 and "is not a judge-eval summary" in err and notes.read_text() == "my notes\n"
    same = tmp_path / "same.jsonl"   # a label no judge can agree or disagree with: the row, not a call failure
    same.write_text(json.dumps({"id": "s1", "prompt": "Q?", "chosen": "Paris.", "rejected": " Paris."}) + "\n")
    rc, _, err = await moaa("judge-eval", "--annotator", "127.0.0.1:9", "--in", str(same), "--no-progress")
    assert rc == 2 and "same.jsonl:1: row 's1': chosen and rejected are the same text" in err, err
