"""Structured outputs: a `StructuredOutput` message as one grammar, checked without a tokenizer.

The grammar library is llguidance (the guidance project's Rust engine): it
takes JSON Schema, regular expressions and Lark grammars (GBNF converts to
Lark) in one grammar format, computes a token mask in tens of microseconds
with no ahead-of-time compilation per schema, has no Python dependencies, and
checks a grammar without a tokenizer, so the gateway refuses a bad one before
it reaches a worker. The workers compile the same text against their
tokenizer (`worker/engine/grammar.py`).

`grammar_of` is the one place a request's structured-output field becomes a
grammar: both the gateway's validation and the worker call it, so they can
never disagree on what a field means.
"""

from __future__ import annotations

import functools
import json

import llguidance
from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

from moemesh.services.core.errors import InvalidRequest
from moemesh.v1 import common_pb2

MAX_SCHEMA_BYTES = 64 * 1024
MAX_REGEX_BYTES = 16 * 1024
MAX_GRAMMAR_BYTES = 64 * 1024
MAX_CHOICES = 256
MAX_CHOICE_BYTES = 1024

# Any JSON object, OpenAI's `json_object`.
JSON_OBJECT_SCHEMA = '{"type": "object"}'
# JSON is written the way json.dumps writes it: ", " and ": " between items, no other whitespace. Flexible
# whitespace lets a model pad with newlines and tabs until max_tokens (small and quantized models do), and
# the text parses the same. A schema's own "x-guidance" options take precedence.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_of(spec: common_pb2.StructuredOutput) -> str:
    """The llguidance grammar of a structured-output field; InvalidRequest naming the field when it is
    malformed, too large, or uses a feature the grammar library does not support.

    Checked grammars are remembered (by the field's bytes), so a schema that every request repeats is read once.
    """
    return _grammar_of(spec.SerializeToString(deterministic=True))


@functools.lru_cache(maxsize=1024)  # a refusal raises, and is not remembered
def _grammar_of(serialized: bytes) -> str:
    spec = common_pb2.StructuredOutput.FromString(serialized)
    kind = spec.WhichOneof("kind")
    if kind is None:
        raise InvalidRequest("sampling.structured", "must set one of json_schema, json_object, regex, choice, grammar")
    field = f"sampling.structured.{kind}"
    try:
        grammar = _GRAMMARS[kind](spec, field)
    except (ValueError, GbnfToLarkError) as exc:  # the library's converters on text they cannot read
        raise InvalidRequest(field, _one_line(str(exc))) from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequest(field, _one_line(error))
    return grammar


def _json_schema(spec: common_pb2.StructuredOutput, field: str) -> str:
    _check_size(field, spec.json_schema, MAX_SCHEMA_BYTES)
    try:
        schema = json.loads(spec.json_schema)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(field, f"is not valid JSON: {exc}") from None
    if not isinstance(schema, dict | bool):
        raise InvalidRequest(field, f"must be a JSON object (a schema), got {type(schema).__name__}")
    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)


def _json_object(spec: common_pb2.StructuredOutput, field: str) -> str:
    if not spec.json_object:
        raise InvalidRequest(field, "must be true when set")
    return llguidance.LLMatcher.grammar_from_json_schema(JSON_OBJECT_SCHEMA, defaults=JSON_OPTIONS)


def _regex(spec: common_pb2.StructuredOutput, field: str) -> str:
    _check_size(field, spec.regex, MAX_REGEX_BYTES)
    return llguidance.LLMatcher.grammar_from_regex(spec.regex)


def _choice(spec: common_pb2.StructuredOutput, field: str) -> str:
    options = list(spec.choice.options)
    if not 1 <= len(options) <= MAX_CHOICES:
        raise InvalidRequest(f"{field}.options", f"needs 1..{MAX_CHOICES} strings, got {len(options)}")
    for i, option in enumerate(options):
        size = len(option.encode())
        if not 1 <= size <= MAX_CHOICE_BYTES:
            raise InvalidRequest(f"{field}.options[{i}]", f"must be 1..{MAX_CHOICE_BYTES} bytes, got {size}")
    # Lark string literals take JSON's escapes.
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options))


def _grammar(spec: common_pb2.StructuredOutput, field: str) -> str:
    _check_size(field, spec.grammar, MAX_GRAMMAR_BYTES)
    if not spec.grammar.strip():
        raise InvalidRequest(field, "must not be empty")
    return llguidance.LLMatcher.grammar_from_lark(any_to_lark(spec.grammar))  # GBNF becomes Lark; Lark stays


_GRAMMARS = {"json_schema": _json_schema, "json_object": _json_object, "regex": _regex, "choice": _choice,
             "grammar": _grammar}


def _check_size(field: str, text: str, limit: int) -> None:
    size = len(text.encode())
    if not 1 <= size <= limit:
        raise InvalidRequest(field, f"must be 1..{limit} bytes, got {size}")


def _one_line(message: str) -> str:
    """The library's (multi-line, caret-annotated) message, short enough for an error detail."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    text = " ".join(line for line in lines if not set(line) <= set("^ |0123456789"))
    return text[:500]
