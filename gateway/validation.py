"""Request validation: every documented limit, each error naming its field."""

from __future__ import annotations

import json
import re

from moemesh.gateway.config import GatewayConfig
from moemesh.services.core.errors import InvalidRequest
from moemesh.services.core.structured import grammar_of
from moemesh.v1 import common_pb2, generation_pb2, models_pb2

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_TOOL_CALLS = 64
MAX_TOOLS_BYTES = 256 * 1024


def validate_size(request, config: GatewayConfig) -> None:
    """A request message above max_request_bytes is refused naming the limit (gRPC's own cap sits above it)."""
    size = request.ByteSize()
    if size > config.max_request_bytes:
        raise InvalidRequest("request", f"{size} bytes; the limit is {config.max_request_bytes} bytes")


def validate_generate(request: generation_pb2.GenerateRequest, model: models_pb2.ModelInfo,
                      config: GatewayConfig) -> None:
    validate_size(request, config)
    _validate_prompt(request.prompt)
    _validate_sampling(request.sampling, model, config)
    if not 0 <= request.priority <= 9:
        raise InvalidRequest("priority", f"must be within 0..9, got {request.priority}")
    if request.request_id and not REQUEST_ID.fullmatch(request.request_id):
        raise InvalidRequest("request_id", "must be 1..128 characters of [A-Za-z0-9._:-]")
    if request.resume_from_index < 0:
        raise InvalidRequest("resume_from_index", "must be >= 0")


def _validate_prompt(prompt: common_pb2.Prompt) -> None:
    kind = prompt.WhichOneof("kind")
    if kind is None:
        raise InvalidRequest("prompt", "is required (text or chat)")
    if kind == "text":
        if not prompt.text.strip():
            raise InvalidRequest("prompt.text", "must not be empty")
        return
    messages = prompt.chat.messages
    if not messages:
        raise InvalidRequest("prompt.chat.messages", "at least one message is required")
    for i, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise InvalidRequest(f"prompt.chat.messages[{i}].role",
                                 f"must be one of {sorted(CHAT_ROLES)}, got {message.role!r}")
        if len(message.tool_calls) > MAX_TOOL_CALLS:
            raise InvalidRequest(f"prompt.chat.messages[{i}].tool_calls",
                                 f"at most {MAX_TOOL_CALLS} calls, got {len(message.tool_calls)}")
        for j, call in enumerate(message.tool_calls):
            _check_json(f"prompt.chat.messages[{i}].tool_calls[{j}].arguments", call.arguments, dict)
    if prompt.chat.tools:
        if len(prompt.chat.tools.encode()) > MAX_TOOLS_BYTES:
            raise InvalidRequest("prompt.chat.tools", f"at most {MAX_TOOLS_BYTES} bytes")
        _check_json("prompt.chat.tools", prompt.chat.tools, list)


def _check_json(field: str, text: str, kind: type) -> None:
    """`text` must be JSON of `kind` (a list or a dict)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(field, f"is not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        raise InvalidRequest(field, f"must be a JSON {'array' if kind is list else 'object'}")


def _check_range(field: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    if not low <= value <= high or (low_open and value == low):  # NaN fails too
        bracket = "(" if low_open else "["
        raise InvalidRequest(field, f"must be within {bracket}{low}, {high}], got {value}")


def _validate_sampling(s: common_pb2.SamplingParams, model: models_pb2.ModelInfo, config: GatewayConfig) -> None:
    if s.HasField("max_tokens"):
        _check_range("sampling.max_tokens", s.max_tokens, 0, model.max_output_tokens)
    if s.HasField("temperature"):
        _check_range("sampling.temperature", s.temperature, 0.0, 2.0)
    if s.HasField("top_p"):
        _check_range("sampling.top_p", s.top_p, 0.0, 1.0, low_open=True)
    if s.HasField("top_k"):
        _check_range("sampling.top_k", s.top_k, 0, 1000)
    if s.HasField("min_p"):
        _check_range("sampling.min_p", s.min_p, 0.0, 1.0)
    for name in ("presence_penalty", "frequency_penalty"):
        if s.HasField(name):
            _check_range(f"sampling.{name}", getattr(s, name), -2.0, 2.0)
    if s.HasField("repetition_penalty"):
        _check_range("sampling.repetition_penalty", s.repetition_penalty, 0.0, 2.0, low_open=True)
    if s.HasField("logprobs"):
        _check_range("sampling.logprobs", s.logprobs, 0, 20)
    if s.HasField("prompt_logprobs"):
        _check_range("sampling.prompt_logprobs", s.prompt_logprobs, 0, 20)
    if s.HasField("structured"):
        grammar_of(s.structured)
    if len(s.stop) > config.max_stop_sequences:
        raise InvalidRequest("sampling.stop", f"at most {config.max_stop_sequences} stop sequences, got {len(s.stop)}")
    for i, stop in enumerate(s.stop):
        size = len(stop.encode())
        if not 1 <= size <= config.max_stop_sequence_bytes:
            raise InvalidRequest(f"sampling.stop[{i}]", f"must be 1..{config.max_stop_sequence_bytes} bytes, got {size}")
    if len(s.stop_token_ids) > config.max_stop_sequences:
        raise InvalidRequest("sampling.stop_token_ids", f"at most {config.max_stop_sequences} ids")


def validate_embed_inputs(inputs: list[str], model: models_pb2.ModelInfo) -> None:
    if not inputs:
        raise InvalidRequest("inputs", "at least one input is required")
    limit = model.max_batch_inputs or len(inputs)
    if len(inputs) > limit:
        raise InvalidRequest("inputs", f"at most {limit} inputs per call, got {len(inputs)}")
    for i, text in enumerate(inputs):
        if not text.strip():
            raise InvalidRequest(f"inputs[{i}]", "must not be empty")
