"""Acceptance: SmolLM2-135M-Instruct (real vLLM server) in three judge roles finds the plainly bad answer.

A 135M model cannot write criteria or JSON, and asked "yes or no" or for a 1-10 score it answers the
same whatever it is shown (measured: "No, the answer is..." for every answer). What it does do, asked
"which answer responds to the question, A or B?", is repeat the answer it prefers; the parser reads
that as the verdict. So the ensemble here is pairwise, in both orders (its position bias cancels),
with three plainly worded judge roles (relevance, topic, language and topic) on the same model.
Measured per role on this set (transformers engine, greedy): each role reads the good answer in both
orders on 3 of 5 prompts; a "correctness" role copied the wrong-language answer and was dropped.
"""
import asyncio
import os

import pytest

from tests.fixtures.annotator import request

# (question, [good, bad]); the bad one is off-topic, in the wrong language, or empty of content. Two answers
# per prompt keep it to 3 judges x both orders = 6 short calls per prompt (a CPU and a 135M model).
HANDCRAFTED = [
    ("What is the capital of France?", ["The capital of France is Paris.", "I like turtles. They swim slowly."]),
    ("How many legs does a spider have?", ["A spider has eight legs.", "Die Sonne scheint heute sehr hell und warm."]),
    ("What do bees make?", ["Bees make honey.", "The stock market closed higher on Tuesday."]),
    ("What is 2 + 2?", ["2 + 2 = 4.", "Je ne sais pas, désolé."]),
    ("What color is the sky on a clear day?", ["The sky is blue on a clear day.", "Hmm... well... I don't know."]),
]
# Required: the bad answer rejected in a majority (3 of 5) and the good one never rejected. Measured on
# 2 CPU cores: 4 of 5 with vLLM (~100 s with the engine's start) and with transformers (~3 min, loaded
# machine); the France prompt is skipped: two roles answered "The answer is B." in both orders, which is
# position, not judgement, so they abstain or tie.
REQUIRED_REJECTED = 3


@pytest.mark.slow
async def test_smollm2_judges_reject_the_bad_answer(smollm2_engines, annotator_factory):
    # whichever engine the session already runs (one at a time on two cores); vLLM when none runs yet
    from moaa.engines import vllm_available

    running = [name for name, s in smollm2_engines.servers.items() if s.running]
    engine = os.environ.get("MOAA_TEST_JUDGE_ENGINE") or (running[0] if running else
                                                          "vllm" if vllm_available() else "transformers")
    srv = await smollm2_engines.get(engine)
    backend = srv.backend_config(max_concurrency=8, health={"probe_interval_s": 3600},
                                 timeouts={"first_token_s": 300, "chunk_gap_s": 120, "total_s": 600}).model_dump()
    sampling = {"temperature": 0.0, "max_tokens": 16}
    roles = {"relevance": "pairwise_small_v1", "topic": "pairwise_small_topic_v1",
             "language": "pairwise_small_language_v1"}
    cfg = {"backends": {"smollm2": backend}, "annotator": {"port": 0},
           "ensembles": {"small": {
               "judges": [{"name": n, "model": "smollm2", "template": t, "sampling": sampling} for n, t in roles.items()],
               "mode": "pairwise", "combine": "mean", "min_margin": 0.5}}}
    stub = await annotator_factory(cfg)
    rejected_bad, good_rejected, lines, calls, bad_ids = 0, 0, [], [], []
    for i, (question, (good, bad)) in enumerate(HANDCRAFTED):
        cands, bad_id = ([good, bad], "c1") if i % 2 == 0 else ([bad, good], "c0")   # the bad one moves
        calls.append(stub.Annotate(request(cands, question=question, id=f"q{i}"), timeout=600))
        bad_ids.append(bad_id)
    responses = await asyncio.gather(*calls)                    # all prompts at once: the server batches
    for (question, _), resp, bad_id in zip(HANDCRAFTED, responses, bad_ids):
        rejected_bad += resp.rejected_id == bad_id
        good_rejected += resp.rejected_id not in ("", bad_id)
        lines.append(f"{question[:30]:<30} bad={bad_id} chosen={resp.chosen_id or '-'} rejected={resp.rejected_id or '-'} "
                     f"skip={resp.skip_reason or '-'} combined={[round(c.score, 2) for c in resp.combined]} "
                     f"bias={[round(j.position_bias, 2) for j in resp.judges]} "
                     f"abstentions={[j.abstentions for j in resp.judges]}")
        assert all(j.requests >= 2 for j in resp.judges)          # both orders, per judge
    report = "\n".join(lines) + f"\nbad answer rejected in {rejected_bad} of {len(HANDCRAFTED)} prompts"
    print(report)
    assert rejected_bad >= REQUIRED_REJECTED and good_rejected == 0, report
