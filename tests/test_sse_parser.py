"""The SSE parser and the chunk shape check: the bytes fast path (orjson) keeps the stdlib's answers."""
import json

import pytest

from moaa.services.backend.sse import DONE, MalformedEvent, SSEParser, check_chat_chunk

STREAM = (b': keep-alive\r\n\r\nevent: x\r\ndata: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\r\n\r\n'
          b'data: {"choices":\ndata: []}\n\nid: 3\ndata:{"usage": {"prompt_tokens": 1}}\n\ndata: [DONE]\n\n')


def parse(chunks) -> list:
    p = SSEParser()
    out = []
    for c in chunks:
        out += p.feed(c)
    return out + p.close()


def test_any_split_of_the_bytes_gives_the_same_events():
    whole = parse([STREAM])
    assert whole[:3] == [{"choices": [{"index": 0, "delta": {"content": "a"}}]}, {"choices": []},
                         {"usage": {"prompt_tokens": 1}}] and whole[3] is DONE and len(whole) == 4
    for cut in range(1, len(STREAM)):
        assert parse([STREAM[:cut], STREAM[cut:]]) == whole
    assert parse([bytes([b]) for b in STREAM]) == whole


def test_what_orjson_refuses_is_read_as_the_stdlib_reads_it():
    # invalid UTF-8 inside a string (replaced), NaN and an integer over 64 bits
    events = parse([b'data: {"t": "\xff", "x": NaN, "n": 123456789012345678901234567890}\n\n'])
    assert events[0]["t"] == "\ufffd" and events[0]["n"] == 123456789012345678901234567890
    with pytest.raises(MalformedEvent, match="not a token count"):
        check_chat_chunk({"usage": {"total_tokens": events[0]["n"]}})


@pytest.mark.parametrize("payload,match", [(b"[1, 2]", "not an object"), (b'{"a": ', "not JSON"),
                                           (b'"text"', "not an object")])
def test_payloads_that_are_not_json_objects_are_malformed(payload, match):
    with pytest.raises(MalformedEvent, match=match):
        parse([b"data: " + payload + b"\n\n"])


SHAPES = [
    {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}], "usage": None},
    {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
    {"choices": [{"index": True, "delta": {}}]}, {"choices": [{"index": -1}]}, {"choices": [{"index": "0"}]},
    {"choices": {"index": 0}}, {"choices": ["x"]}, {"choices": [{"delta": "x"}]},
    {"choices": [{"delta": {"content": 5}}]}, {"choices": [{"text": ["x"]}]}, {"choices": [{"finish_reason": 1}]},
    {"usage": []}, {"usage": {"prompt_tokens": -1}}, {"usage": {"completion_tokens": 1.5}},
    {"usage": {"total_tokens": False}}, {"usage": {"total_tokens": 1 << 62}}, {},
]


@pytest.mark.parametrize("ev", SHAPES, ids=[json.dumps(s)[:40] for s in SHAPES])
def test_the_fast_shape_check_passes_only_good_shapes_and_bad_ones_get_the_full_message(ev):
    from moaa.services.backend import sse

    good = ev in SHAPES[:2] or ev == {}
    assert sse._plain_chunk(ev) == good
    if good:
        assert check_chat_chunk(ev) is ev
    else:
        with pytest.raises(MalformedEvent, match=r" is .*not "):
            check_chat_chunk(ev)
