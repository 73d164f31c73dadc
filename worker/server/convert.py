"""Protobuf <-> worker records, at the edge of the worker service."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from moemesh.services.core.errors import InvalidRequest
from moemesh.v1 import common_pb2, worker_pb2
from moemesh.worker.engine.requests import GenerationRequest, RequestOutput
from moemesh.worker.engine.sampling import SamplingParams, TokenLogprobs
from moemesh.worker.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from moemesh.worker.engine.grammar import Grammar

MAX_CACHE_SCOPE_CHARS = 512  # GenerationWork.cache_scope's documented limit

FINISH_REASONS = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "stop": common_pb2.FINISH_REASON_STOP,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "deadline": common_pb2.FINISH_REASON_DEADLINE,
    "context": common_pb2.FINISH_REASON_CONTEXT,
}


def sampling_from_pb(pb: common_pb2.SamplingParams, defaults: dict) -> SamplingParams:
    """Apply the model's generation defaults to unset fields.

    ``repetition_penalty`` is a generation_config.json key and falls back to the
    model's default, then 1 (off); presence and frequency penalties are not, and
    fall back to 0. Unset ``logprobs`` means none.
    """

    def pick(name: str, fallback: float | int | None):
        if pb.HasField(name):
            return getattr(pb, name)
        return defaults.get(name, fallback)

    temperature = pick("temperature", 1.0)
    if not pb.HasField("temperature") and not defaults.get("do_sample", True):
        temperature = 0.0
    return SamplingParams(
        max_tokens=int(pick("max_tokens", 128)),
        temperature=float(temperature),
        top_p=float(pick("top_p", 1.0)),
        top_k=int(pick("top_k", 0) or 0),
        min_p=float(pick("min_p", 0.0) or 0.0),
        seed=pb.seed if pb.HasField("seed") else None,
        stop=tuple(pb.stop),
        stop_token_ids=tuple(pb.stop_token_ids),
        ignore_eos=pb.ignore_eos,
        presence_penalty=float(pb.presence_penalty) if pb.HasField("presence_penalty") else 0.0,
        frequency_penalty=float(pb.frequency_penalty) if pb.HasField("frequency_penalty") else 0.0,
        repetition_penalty=float(pick("repetition_penalty", 1.0) or 1.0),
        logprobs=pb.logprobs if pb.HasField("logprobs") else None,
        prompt_logprobs=pb.prompt_logprobs if pb.HasField("prompt_logprobs") else None,
    )


def prompt_token_ids(work: worker_pb2.GenerationWork, tokenizer: Tokenizer) -> tuple[int, ...]:
    """The prompt as token ids: given, or templated and tokenized here."""
    if work.prompt_token_ids:
        return tuple(work.prompt_token_ids)
    kind = work.prompt.WhichOneof("kind")
    if kind == "chat":
        chat = work.prompt.chat
        extra = {"tools": json.loads(chat.tools)} if chat.tools else {}
        text = tokenizer.apply_chat_template([chat_message(m) for m in chat.messages], **extra)
        return tuple(tokenizer.encode(text, add_special_tokens=False))
    return tuple(tokenizer.encode(work.prompt.text))


def chat_message(message: common_pb2.ChatMessage) -> dict:
    """A chat message as chat templates take it (OpenAI's shape; tool call arguments as parsed JSON, which is
    what the published templates expect)."""
    result = {"role": message.role, "content": message.content}
    if message.name:
        result["name"] = message.name
    if message.tool_calls:
        result["tool_calls"] = [{"id": c.id, "type": "function",
                                 "function": {"name": c.name, "arguments": json.loads(c.arguments or "{}")}}
                                for c in message.tool_calls]
    if message.tool_call_id:
        result["tool_call_id"] = message.tool_call_id
    return result


def request_from_pb(work: worker_pb2.GenerationWork, tokenizer: Tokenizer, defaults: dict,
                    grammar: Grammar | None = None) -> GenerationRequest:
    """The engine's request; `grammar` is the compiled `sampling.structured` (the caller compiles it)."""
    return GenerationRequest(
        request_id=work.request_id,
        prompt_token_ids=prompt_token_ids(work, tokenizer),
        params=sampling_from_pb(work.sampling, defaults),
        deadline=work.deadline_unix or None,
        resume_token_ids=tuple(work.resume_token_ids),
        resume_text_chars=work.resume_text_chars,
        grammar=grammar,
        cache_scope=checked_cache_scope(work.cache_scope),
    )


def checked_cache_scope(scope: str) -> str:
    """The work's cache scope, bounded like any input (InvalidRequest naming the field when it is too long)."""
    if len(scope) > MAX_CACHE_SCOPE_CHARS:
        raise InvalidRequest("cache_scope", f"{len(scope)} characters; the limit is {MAX_CACHE_SCOPE_CHARS}")
    return scope


def output_to_pb(output: RequestOutput, tokenizer: Tokenizer) -> worker_pb2.RequestEvent:
    """One step's output of one request as a RequestEvent, logprobs (with token texts) included when it has them."""
    event = worker_pb2.RequestEvent(
        request_id=output.request_id,
        text=output.text,
        token_ids=output.token_ids,
        logprobs=[logprob_to_pb(lp, tokenizer) for lp in output.logprobs],
        finish_reason=FINISH_REASONS[output.finish_reason],
        prompt_logprobs=[logprob_to_pb(lp, tokenizer) for lp in output.prompt_logprobs],
    )
    if output.finish_reason is not None:
        event.usage.CopyFrom(common_pb2.Usage(
            prompt_tokens=output.prompt_tokens,
            completion_tokens=output.completion_tokens,
            cached_tokens=output.cached_tokens,
        ))
    return event


def logprob_to_pb(logprob: TokenLogprobs, tokenizer: Tokenizer) -> common_pb2.TokenLogprob:
    """A token's logprob and its top alternatives (best first) as a TokenLogprob, each with its text."""
    text = tokenizer.token_text
    return common_pb2.TokenLogprob(
        token_id=logprob.token_id,
        logprob=logprob.logprob,
        token=text(logprob.token_id),
        top=[common_pb2.TopLogprob(token_id=token_id, logprob=value, token=text(token_id))
             for token_id, value in logprob.top],
    )
