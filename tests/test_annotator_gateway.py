"""End to end: a real gateway's Sample(annotate=true) -> a real annotator server -> emulated judges."""
import json

import grpc
import pytest

from moaa.v1 import gateway_pb2
from tests.fixtures.annotator import judge_config
from tests.fixtures.gateway import backend, user


async def test_gateway_sample_with_annotation_returns_preference_pair(gw_emulators, judge_emulator, annotator_factory,
                                                                      gateway_factory):
    sampler = await gw_emulators()
    cfg = judge_config(judge_emulator.url, {"j1": "longest", "j2": "longest+text"}, aggregator="longest",
                       min_margin=0.5)
    annotator = await annotator_factory(cfg)
    gw_cfg = {k: v for k, v in cfg.items() if k != "annotator"}
    gw_cfg["backends"]["sft"] = backend(sampler.url)
    gw_cfg.update(gateway={"port": 0}, annotator_address=annotator.server.address)
    gw = await gateway_factory(gw_cfg)

    resp = await gw.stub.Sample(gateway_pb2.SampleRequest(
        id="row-7", model="sft", n=4, messages=user("Explain preference pairs."), annotate=True,
        sampling={"max_tokens": 12, "temperature": 1.0}))
    assert len(resp.samples) == 4
    ann = resp.annotation
    assert ann.id == "row-7" and not ann.skipped, ann.skip_reason
    by_len = sorted(resp.samples, key=lambda s: len(s.text))
    assert ann.chosen_id == str(by_len[-1].index) and ann.rejected_id == str(by_len[0].index)
    assert [j.judge for j in ann.judges] == ["j1", "j2", "agg"] and ann.combine == "aggregator"
    assert all(j.template_hash for j in ann.judges)

    # more samples than the annotator takes: the samples come back, the annotator's refusal listed
    small = await annotator_factory({**cfg, "annotator": {**cfg["annotator"], "max_candidates": 3}})
    gw_small = await gateway_factory({**gw_cfg, "annotator_address": small.server.address})
    resp = await gw_small.stub.Sample(gateway_pb2.SampleRequest(model="sft", n=4, messages=user("Four, please."),
                                                                annotate=True, sampling={"max_tokens": 8}))
    assert len(resp.samples) == 4 and not resp.HasField("annotation")
    (failure,) = resp.failures
    assert failure.model == "annotator" and failure.cause == "invalid_argument" and "max_candidates" in failure.message

    # a named ensemble that does not exist is refused by the gateway with a message
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Sample(gateway_pb2.SampleRequest(model="sft", n=2, messages=user("x"), annotate=True,
                                                       ensemble="nope"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nope" in err.value.details()


async def test_gateway_reaches_a_mutual_tls_annotator(gw_emulators, judge_emulator, annotator_factory, gateway_factory,
                                                      gw_tls_files):
    t = gw_tls_files
    sampler = await gw_emulators()
    cfg = judge_config(judge_emulator.url, {"j1": "longest"}, annotator={"tls": {
        "cert_file": t["server.crt"], "key_file": t["server.key"], "client_ca_file": t["ca.crt"]}})
    annotator = await annotator_factory(cfg)
    gw_cfg = {k: v for k, v in cfg.items() if k != "annotator"}
    gw_cfg["backends"]["sft"] = backend(sampler.url)
    gw_cfg.update(gateway={"port": 0}, annotator_address=annotator.server.address)
    ask = gateway_pb2.SampleRequest(model="sft", n=2, messages=user("Explain TLS."), annotate=True,
                                    sampling={"max_tokens": 8})

    gw = await gateway_factory({**gw_cfg, "annotator_tls": {"ca_file": t["ca.crt"], "cert_file": t["client.crt"],
                                                            "key_file": t["client.key"]}})
    resp = await gw.stub.Sample(ask, timeout=10)
    assert len(resp.annotation.judges) == 1 and resp.annotation.judges[0].judge == "j1"

    # trusted server but no client certificate: the annotator refuses the handshake; the caller is told
    gw_no_cert = await gateway_factory({**gw_cfg, "annotator_tls": {"ca_file": t["ca.crt"]}})
    resp = await gw_no_cert.stub.Sample(ask, timeout=10)
    assert len(resp.samples) == 2 and not resp.HasField("annotation")
    assert [(f.model, f.cause) for f in resp.failures] == [("annotator", "unavailable")]
    assert "annotator at" in resp.failures[0].message


async def test_gateway_dials_a_headless_target_checking_the_certificate_by_server_name(
        gw_emulators, judge_emulator, annotator_factory, gateway_factory, gw_tls_files, tmp_path):
    """The chart's headless target (dns:///...-annotator-headless) is not a name the annotator's certificate holds:
    `annotator_tls.server_name` checks it against the Service's name. Without it the handshake fails; the client
    commands' --tls-server-name does the same, and without it they exit 2 at once (a retry meets the same name)."""
    from tests.fixtures.cli import run_moaa as moaa
    from tests.test_annotator_cli import BAD, GOOD

    t = gw_tls_files
    sampler = await gw_emulators()
    cfg = judge_config(judge_emulator.url, {"j1": "longest"}, annotator={"tls": {
        "cert_file": t["named.crt"], "key_file": t["named.key"]}})   # names moaa-annotator only
    annotator = await annotator_factory(cfg)
    gw_cfg = {k: v for k, v in cfg.items() if k != "annotator"}
    gw_cfg["backends"]["sft"] = backend(sampler.url)
    gw_cfg.update(gateway={"port": 0}, annotator_address=f"dns:///{annotator.server.address}")
    ask = gateway_pb2.SampleRequest(model="sft", n=2, messages=user("Explain SNI."), annotate=True,
                                    sampling={"max_tokens": 8})
    gw = await gateway_factory({**gw_cfg, "annotator_tls": {"ca_file": t["ca.crt"], "server_name": "moaa-annotator"}})
    resp = await gw.stub.Sample(ask, timeout=10)
    assert len(resp.annotation.judges) == 1
    gw_by_address = await gateway_factory({**gw_cfg, "annotator_tls": {"ca_file": t["ca.crt"]}})
    resp = await gw_by_address.stub.Sample(ask, timeout=10)
    assert not resp.HasField("annotation") and [(f.model, f.cause) for f in resp.failures] == [("annotator",
                                                                                               "unavailable")]

    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text(json.dumps({"id": "l0", "prompt": "Capital of France?", "chosen": GOOD, "rejected": BAD}) + "\n")
    flags = ("judge-eval", "--in", str(labelled), "--annotator", annotator.server.address, "--tls-ca", t["ca.crt"])
    rc, stdout, err = await moaa(*flags, "--tls-server-name", "moaa-annotator")
    assert rc == 0 and "1 labelled rows" in stdout, err
    rc, _, err = await moaa(*flags)   # the name is the caller's to fix: refused at once (exit 2), not retried
    assert rc == 2 and "Hostname Verification" in err and "--tls-server-name" in err and "tries" not in err, err
    rc, _, err = await moaa(*flags[:-2])   # TLS is off on the command, on at the annotator: retried (a restart reads so)
    assert rc == 75 and "4 tries" in err, err


async def test_annotator_tls_config_errors(tmp_path):
    from moaa.errors import UserError
    from moaa.services.config import ConfigError, parse_config
    from moaa.services.gateway.server import start_gateway

    base = {"backends": {"m": backend("http://127.0.0.1:9/v1")}, "gateway": {"port": 0},
            "annotator_address": "127.0.0.1:9"}
    with pytest.raises(ConfigError, match="both cert_file and key_file"):
        parse_config({**base, "annotator_tls": {"cert_file": "c.crt"}})
    missing = str(tmp_path / "nope.crt")
    with pytest.raises(UserError, match="cannot read CA certificate"):
        await start_gateway(parse_config({**base, "annotator_tls": {"ca_file": missing}}), probes=False)


def _moa_gateway_config(judges_cfg: dict, moa_url: str, annotator_address: str | None) -> dict:
    """Proposers answering 4 and 8 tokens, an aggregator answering 12: 'longest' judges prefer the aggregate."""
    cfg = {k: v for k, v in judges_cfg.items() if k != "annotator"}
    for name in ("p1", "p2", "agg"):
        cfg["backends"][name] = backend(moa_url)
    cfg["recipes"] = {"moa": {"proposers": [{"model": "p1", "sampling": {"max_tokens": 4}},
                                            {"model": "p2", "sampling": {"max_tokens": 8}}],
                              "aggregator": {"model": "agg", "sampling": {"max_tokens": 12}}}}
    cfg.update(default_recipe="moa", gateway={"port": 0})
    if annotator_address:
        cfg["annotator_address"] = annotator_address
    return cfg


async def test_generate_and_batch_items_can_be_annotated(gw_emulators, judge_emulator, annotator_factory,
                                                         gateway_factory):
    moa = await gw_emulators()
    judges = judge_config(judge_emulator.url, {"j1": "longest", "j2": "longest"}, min_margin=0.5)
    annotator = await annotator_factory(judges)
    gw = await gateway_factory(_moa_gateway_config(judges, moa.url, annotator.server.address))
    ask = gateway_pb2.GenerateRequest(messages=user("Explain MoA."), annotate=True)

    resp = await gw.stub.Generate(ask, timeout=10)
    ann = resp.annotation
    assert resp.text and not resp.failures
    assert sorted(c.candidate_id for c in ann.combined) == ["L1-P0", "L1-P1", "aggregate"]
    assert ann.chosen_id == "aggregate" and ann.rejected_id == "L1-P0", ann
    assert [j.judge for j in ann.judges] == ["j1", "j2"]

    # GenerateBatch: only the item that asks for it is annotated
    items = [gateway_pb2.BatchItem(id="a", request=ask),
             gateway_pb2.BatchItem(id="b", request=gateway_pb2.GenerateRequest(messages=user("Explain MoA.")))]
    results = {r.id: r async for r in gw.stub.GenerateBatch(iter(items), timeout=10)}
    assert results["a"].response.annotation.chosen_id == "aggregate"
    assert not results["b"].response.HasField("annotation")

    # GenerateStream: the final event carries the annotation
    events = [ev async for ev in gw.stub.GenerateStream(ask, timeout=10)]
    assert events[-1].final.annotation.chosen_id == "aggregate"


async def test_generate_annotate_errors(gw_emulators, gateway_factory, unused_tcp_port):
    moa = await gw_emulators()
    judges = judge_config("http://127.0.0.1:9/v1", {"j1": "longest"})
    ask = gateway_pb2.GenerateRequest(messages=user("Explain MoA."), annotate=True)

    no_annotator = await gateway_factory(_moa_gateway_config(judges, moa.url, None))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await no_annotator.stub.Generate(ask, timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "annotator_address" in err.value.details()

    gw = await gateway_factory(_moa_gateway_config(judges, moa.url, f"127.0.0.1:{unused_tcp_port}"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Generate(gateway_pb2.GenerateRequest(messages=user("x"), annotate=True, ensemble="nope"),
                               timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nope" in err.value.details()

    # an annotator that is down loses nothing: the answer comes back, the failure is listed
    resp = await gw.stub.Generate(ask, timeout=10)
    assert resp.text and not resp.HasField("annotation")
    (failure,) = resp.failures
    assert failure.model == "annotator" and failure.cause == "unavailable" and "annotator at" in failure.message


async def test_generate_sends_the_annotator_each_text_once(gw_emulators, judge_emulator, annotator_factory,
                                                           gateway_factory):
    """Two proposers that write the same text (one model, one request): the annotator, which refuses a pair
    of one text, gets it once; with fewer than two distinct texts the annotation is a skip, no call made."""
    from moaa.services.gateway.annotation import annotate_moa

    moa = await gw_emulators()
    judges = judge_config(judge_emulator.url, {"j1": "longest"}, min_margin=0.5)
    annotator = await annotator_factory(judges)
    cfg = _moa_gateway_config(judges, moa.url, annotator.server.address)
    cfg["recipes"]["moa"]["proposers"] = [{"model": "p1", "sampling": {"max_tokens": 4, "seed": 1}}] * 2
    gw = await gateway_factory(cfg)
    resp = await gw.stub.Generate(gateway_pb2.GenerateRequest(messages=user("Explain MoA."), annotate=True), timeout=10)
    texts = [p.text for p in resp.layers[0].proposals]
    assert len(texts) == 2 and texts[0] == texts[1] and not resp.failures, resp
    assert sorted(c.candidate_id for c in resp.annotation.combined) == ["L1-P0", "aggregate"]

    one = gateway_pb2.GenerateResponse(request_id="r", text="Same.", aggregator_model="agg")
    one.layers.add(layer=1).proposals.add(layer=1, index=0, text=" Same.", model="p1")
    await annotate_moa(None, gateway_pb2.GenerateRequest(), one, timeout=1)
    assert one.annotation.skipped and one.annotation.skip_reason == "too_few_candidates: 1 distinct answers of 2"
