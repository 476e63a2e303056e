"""The annotator: MoA as a reward model. An ensemble of LLM judges scores candidate answers and picks
the chosen/rejected pair for DPO (PAPER.md, stage 2).

    templates.py   versioned judging prompts (templates/*.txt), sha256 recorded in every annotation
    parsing.py     scores and verdicts read from free text
    stats.py       seeded permutations, position bias, Kendall tau agreement, Spearman length correlation
    combine.py     dynamic criteria filtering, mean/weighted/aggregator combining, chosen/rejected, skips
    judging.py     one judge's calls (pointwise all-at-once or one-per-answer, pairwise both orders)
    engine.py      one prompt: every judge at once through the shared BackendPool, then the aggregator
    validation.py  AnnotateRequest -> Job, INVALID_ARGUMENT with a message
    servicer.py    grpc.aio Annotator (Annotate, AnnotateStream with a bounded window); server.py starts it
The clients (`moaa annotate`, `moaa judge-eval`) live in the one client package, `moaa/client/`. Emulated judges: `moaa backend emulate --judge true`.
"""
