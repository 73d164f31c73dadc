"""gateway.json_body: strict decoding of the HTTP API's JSON bodies (the routes are tested through a real mesh in
tests/integration/test_openai_http.py)."""

from __future__ import annotations

import json

import pytest

from moemesh.gateway.json_body import decode


@pytest.mark.parametrize(
    ("text", "at"),
    [
        (r'"\ud800"', 1),  # a high half alone
        (r'"\udc00"', 1),  # a low half alone
        (r'"ab\ud83d"', 3),  # a high half at the end of a string
        (r'["\ud83d", "\ude00"]', 2),  # the two halves in different strings
        (r'"\ud83d\n\ude00"', 1),  # another escape between them
        (r'"\ud83dx\ude00"', 1),  # a character between them
        (r'"\ud83d\ud83d\ude00"', 1),  # two high halves, then one low: the first is alone
        (r'"\ud83d\ude00\ude00"', 13),  # a pair, then a low half alone
        (r'{"\udfff": 1}', 2),  # in a key
        (r'"\\\ud800"', 3),  # an escaped backslash, then a lone half
        (r'"\uD800"', 1),  # upper-case hex
    ],
)
def test_lone_surrogate_halves_are_refused_where_they_start(text, at):
    json.loads(text)  # Python's json (FastAPI's) accepts every one of them
    with pytest.raises(json.JSONDecodeError) as caught:
        decode(text.encode())
    assert caught.value.pos == at and "surrogate" in caught.value.msg, caught.value


@pytest.mark.parametrize(
    "text",
    [
        r'"\ud83d\ude00"',  # a pair: how json.dumps writes an emoji by default
        r'{"a": ["\ud83d\ude00 \uDBFF\uDFFF", "\u00e9"]}',
        r'"\\ud800"',  # an escaped backslash, then the letters "ud800": no escape at all
        r'"\\\\ud800"',
        r'"nul \u0000 inside"',
        '"\U0001F600 written as UTF-8"',
        '{"seed": 18446744073709551615, "t": 0.7, "n": null, "stream": true}',
    ],
)
def test_text_without_a_lone_half_decodes_as_json_does(text):
    assert decode(text.encode()) == json.loads(text)


def test_a_body_that_is_not_utf8_is_refused_at_its_first_bad_byte():
    for body, at, byte in ((b'{"p": "caf\xe9"}', 10, "e9"), ('"x"'.encode("utf-16"), 0, "ff"), (b'"\xed\xa0\x80"', 1, "ed")):
        with pytest.raises(json.JSONDecodeError) as caught:
            decode(body)
        assert (caught.value.pos, caught.value.msg) == (at, f"the body is not UTF-8 (byte 0x{byte})")


@pytest.mark.parametrize("body", [b'{"a": ', b'{"t": NaN}', b'{"x": 1e400}', b"[" * 2000 + b"]" * 2000, b""])
def test_what_json_would_take_or_choke_on_is_malformed_json(body):
    """NaN and an infinite number are not JSON; nesting past 1,024 was a RecursionError (a generic 400) in json."""
    with pytest.raises(json.JSONDecodeError):
        decode(body)
