"""Acceptance on a real model: SmolLM2-135M-Instruct on the embedded engine (transformers' server) as two
proposers and the aggregator, answering through the gateway's OpenAI-compatible door, called with the
official `openai` client: a streamed MoA answer and a pass-through answer."""
from __future__ import annotations

import openai
import pytest

from tests.test_gateway_smollm2 import _backend

pytestmark = pytest.mark.slow


async def test_smollm2_answers_through_the_http_door(transformers_smollm2_server, gateway_factory):
    sampling = {"max_tokens": 24, "seed": 7}
    cfg = {
        "backends": {"smol": _backend(transformers_smollm2_server)},
        "recipes": {"moa": {
            "proposers": [
                {"model": "smol", "system_prompt": "You are a precise assistant. Answer briefly.",
                 "sampling": {**sampling, "temperature": 0.2}},
                {"model": "smol", "system_prompt": "You are a friendly teacher.",
                 "sampling": {**sampling, "temperature": 0.8}},
            ],
            "aggregator": {"model": "smol", "sampling": {"temperature": 0.0}},
        }},
        "gateway": {"port": 0, "http_port": 0},
    }
    gw = await gateway_factory(cfg)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.running.http_port}/v1", api_key="none",
                                max_retries=0, timeout=900)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    stream = await client.chat.completions.create(model="moa", messages=question, stream=True, max_tokens=24,
                                                  stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    finish = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    moa = finish.model_extra["moaa"]
    assert len(moa["layers"][0]["proposals"]) == 2 and all(p["text"].strip() for p in moa["layers"][0]["proposals"])
    assert not moa["failures"] and chunks[-1].usage.completion_tokens > 0
    plain = await client.chat.completions.create(model="smol", messages=question, max_tokens=16, temperature=0.0)
    assert plain.choices[0].message.content.strip() and plain.usage.prompt_tokens > 0
    assert plain.model_extra["moaa"]["kind"] == "backend"
