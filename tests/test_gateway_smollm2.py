"""Acceptance on a real model: SmolLM2-135M-Instruct behind the embedded backend as three proposers
(different temperatures and system prompts) and the aggregator. A recording proxy in front of the
aggregator's backend shows what the aggregator actually received."""
from __future__ import annotations

import pytest

from moaa.v1 import common_pb2, gateway_pb2

pytestmark = pytest.mark.slow


@pytest.fixture
def smollm2_server(request):
    try:
        return request.getfixturevalue("transformers_smollm2_server")
    except pytest.FixtureLookupError:
        pytest.skip("fixture transformers_smollm2_server (tests/fixtures/models.py) is not available")


def _backend(server, url: str | None = None) -> dict:
    cfg = server.backend_config().model_dump(mode="json", exclude_none=True)
    cfg["urls"] = [url] if url else cfg["urls"]
    cfg["health"] = {"probe_interval_s": 3600}
    # two shared cores: a CPU engine can be slow to accept and to start answering
    cfg["timeouts"] = {"connect_s": 60, "first_token_s": 600, "chunk_gap_s": 300, "total_s": 900}
    if getattr(server, "model_path", None):
        cfg["tokenizer"] = str(server.model_path)  # count references with the model's own tokenizer
    return cfg


async def test_smollm2_three_proposers_and_aggregator(smollm2_server, gw_recording_proxy, gateway_factory):
    proxy = await gw_recording_proxy(smollm2_server.base_url)
    sampling = {"max_tokens": 24, "seed": 7}
    cfg = {
        "backends": {"smol": _backend(smollm2_server), "smol-agg": _backend(smollm2_server, proxy.url)},
        "recipes": {"moa": {
            "proposers": [
                {"model": "smol", "system_prompt": "You are a precise assistant. Answer briefly.",
                 "sampling": {**sampling, "temperature": 0.2}},
                {"model": "smol", "system_prompt": "You are a friendly teacher.",
                 "sampling": {**sampling, "temperature": 0.7}},
                {"model": "smol", "system_prompt": "You are a creative writer.",
                 "sampling": {**sampling, "temperature": 1.0}},
            ],
            "aggregator": {"model": "smol-agg", "sampling": {**sampling, "temperature": 0.0}},
        }},
        "gateway": {"port": 0},
    }
    gw = await gateway_factory(cfg)
    resp = await gw.stub.Generate(gateway_pb2.GenerateRequest(messages=[
        common_pb2.Message(role="user", content="What is the capital of France?")]), timeout=900)
    proposals = resp.layers[0].proposals
    assert len(proposals) == 3 and all(p.text.strip() and p.used for p in proposals)
    assert resp.text.strip() and resp.aggregator_model == "smol-agg"
    assert not resp.failures
    agg_bodies = [b for b in proxy.bodies if b["messages"][0]["role"] == "system"]
    assert len(agg_bodies) == 1
    system = agg_bodies[0]["messages"][0]["content"]
    for p in proposals:
        assert p.text.strip() in system
    assert agg_bodies[0]["messages"][-1] == {"role": "user", "content": "What is the capital of France?"}
    assert {u.model for u in resp.usage} == {"smol", "smol-agg"}
