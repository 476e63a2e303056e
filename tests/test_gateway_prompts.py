"""Pure parts of the gateway: MoA prompt building and fitting references into a context window."""
from __future__ import annotations

from moaa.services.gateway.context import TRIM_MARKER, TokenCounter, counter_for, fit_references
from moaa.services.gateway.prompts import AGGREGATE_INSTRUCTION, build_messages, format_references


def test_layer_one_messages_are_the_conversation():
    conv = [{"role": "user", "content": "hi"}]
    assert build_messages(conv) == conv
    assert build_messages(conv, "Be brief.") == [{"role": "system", "content": "Be brief."}, *conv]


def test_references_numbered_in_system_prompt_after_existing_system_message():
    conv = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    out = build_messages(conv, None, ["first answer", " second answer "])
    assert out[0]["role"] == "system"
    assert out[0]["content"] == ("Answer in French.\n\n" + AGGREGATE_INSTRUCTION + "\n\n1. first answer\n\n2. second answer")
    assert out[1:] == conv[1:]
    assert format_references(["x"]) == "1. x"
    custom = build_messages(conv[1:], None, ["r"], instruction="Merge these.")
    assert custom[0]["content"] == "Merge these.\n\n1. r"


def test_fit_keeps_short_references_whole():
    c = counter_for(None)
    fit = fit_references(["short", "also short"], fixed_messages=[{"role": "user", "content": "q"}],
                         context_window=4096, reply_tokens=256, counter=c)
    assert fit.references == ["short", "also short"] and not fit.trimmed and fit.notes == []


def test_fit_trims_longest_first_with_marker():
    c = TokenCounter(None)
    refs = ["a" * 3000, "b" * 60, "c" * 9000]
    fit = fit_references(refs, fixed_messages=[{"role": "user", "content": "q"}], context_window=1024,
                         reply_tokens=100, counter=c)
    assert fit.trimmed_tokens[1] == 0 and fit.references[1] == refs[1]
    assert fit.trimmed_tokens[0] > 0 and fit.trimmed_tokens[2] > fit.trimmed_tokens[0]
    assert fit.references[2].endswith(TRIM_MARKER.format(n=fit.trimmed_tokens[2]))
    assert fit.tokens <= fit.budget
    assert "1024-token context window" in fit.notes[0]


def test_reference_max_tokens_caps_each_reference():
    c = TokenCounter(None)
    fit = fit_references(["x" * 600], fixed_messages=[], context_window=100_000, reply_tokens=10, counter=c,
                         reference_max_tokens=50)
    assert fit.trimmed and c.count(fit.references[0]) <= 50


def test_real_tokenizer_counts_and_truncates(tiny_model_dir):
    c = TokenCounter(str(tiny_model_dir))
    assert c.exact
    text = "hello world " * 200
    n = c.count(text)
    assert n > 0 and c.count(c.truncate(text, 10)) <= 10
    fit = fit_references([text, text], fixed_messages=[{"role": "user", "content": "q"}], context_window=256,
                         reply_tokens=32, counter=c)
    assert fit.exact and fit.trimmed and fit.tokens <= fit.budget


def test_missing_tokenizer_falls_back_to_estimate(tmp_path):
    c = TokenCounter(str(tmp_path / "no-such-tokenizer"))
    assert not c.exact and c.count("abcdef") == 2
