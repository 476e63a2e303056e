"""The one `--set` grammar (moaa/overrides.py): JSON values, bare words as strings, the same for every command."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moaa.cli.main import build_parser
from moaa.errors import UserError
from moaa.overrides import apply_sets, format_set, parse_set, parse_value


@pytest.mark.parametrize("text,value", [
    ("no", "no"), ("off", "off"), ("yes", "yes"),               # YAML 1.1 would make these booleans
    ("true", True), ("false", False), ("null", None),
    ("3", 3), ("-1", -1), ("2e-5", 2e-5), ("0.5", 0.5),
    ('"007"', "007"), ("007", "007"),                           # not JSON (leading zero): the string as typed
    ('"no"', "no"), ("", ""), ("cosine", "cosine"), ("q_proj,v_proj", "q_proj,v_proj"),
    ("NaN", "NaN"), ("Infinity", "Infinity"),                   # not JSON: strings, then refused by typed fields
    ('["sigmoid","sft"]', ["sigmoid", "sft"]), ('{"r": 8}', {"r": 8}), ("[]", []),
    ("a=b", "a=b"),                                              # only the first = splits key from value
])
def test_values(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


@pytest.mark.parametrize("text", ["[sigmoid, sft]", "{r: 8}", " [1,"])
def test_list_or_object_that_is_not_json_is_refused(text):
    with pytest.raises(UserError, match="not valid JSON: write lists and objects as JSON"):
        parse_value(text)


@pytest.mark.parametrize("item", ["novalue", "=3", "a..b=1", ".a=1", "a.=1"])
def test_bad_items(item):
    with pytest.raises(UserError, match="use KEY=VALUE"):
        parse_set(item)


def test_nested_paths_create_sections_and_never_mutate_the_input():
    base = {"sft": {"max_steps": 4, "lr": 1}}
    out = apply_sets(base, ["sft.max_steps=20", "sft.trl.save_strategy=no", "answer_tokens=16", "sft.max_steps=21"])
    assert out == {"sft": {"max_steps": 21, "lr": 1, "trl": {"save_strategy": "no"}}, "answer_tokens": 16}
    assert base == {"sft": {"max_steps": 4, "lr": 1}}
    with pytest.raises(UserError, match="sft.max_steps is a value, not a section"):
        apply_sets(base, ["sft.max_steps.x=1"])


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


@given(value=json_values)
def test_format_set_is_the_inverse_of_parse_set(value):
    assert parse_set(format_set("a.b", value)) == (["a", "b"], value)


def _set_options(parser, path=()):
    """(command path, action) for every --set option in the CLI tree."""
    import argparse

    for action in parser._actions:
        if "--set" in action.option_strings:
            yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _set_options(sub, (*path, name))


def test_every_set_option_uses_the_one_grammar():
    """Every --set of the CLI (pipeline run, train sft|dpo|submit) collects items for apply_sets."""
    found = {path: action for path, action in _set_options(build_parser())}
    assert set(found) == {("pipeline", "run"), ("train", "sft"), ("train", "dpo"), ("train", "submit")}
    parser = build_parser()
    for path in found:
        extra = ["dpo"] if path[-1] == "submit" else []
        paths = [] if path[0] == "pipeline" else ["--data", "d", "--model", "m", "--out", "o"]
        args = parser.parse_args([*path, *extra, *paths, "--set", "trl.save_strategy=no", "--set", "x=1"])
        assert apply_sets({}, args.overrides) == {"trl": {"save_strategy": "no"}, "x": 1}
