"""OpenAI response shapes: the whole answer, or its server-sent-event chunks, of a completion or a chat completion.

The two endpoints share one generation path and one streaming loop; a shape says only how an answer and an event
look to the client. The gateway holds no tokenizer, so a token in `logprobs` is written "token_id:<id>" (as vLLM's
return_tokens_as_token_ids does).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Iterator

from moemesh.gateway.deadlines import EventStream
from moemesh.gateway.generation import Generation
from moemesh.gateway.openai_errors import error_of
from moemesh.services.core.errors import DeadlineExceeded, MeshError, Unavailable
from moemesh.v1 import common_pb2, generation_pb2


def _finish(reason: int) -> str | MeshError:
    """OpenAI's finish_reason, or the error to return instead: an aborted or expired generation is no answer."""
    if reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_CONTEXT):
        return "length"
    if reason == common_pb2.FINISH_REASON_STOP:
        return "stop"
    if reason == common_pb2.FINISH_REASON_DEADLINE:
        return DeadlineExceeded("the request's deadline passed mid-generation")
    if reason == common_pb2.FINISH_REASON_ABORT:
        return Unavailable("the generation was aborted by the mesh; retry")
    return Unavailable(f"the generation ended without a finish reason ({reason})")


def finish_reason(reason: int) -> str:
    """OpenAI's finish_reason; raises the error instead when the generation ended without an answer."""
    finish = _finish(reason)
    if isinstance(finish, MeshError):
        raise finish
    return finish


def usage_object(usage: common_pb2.Usage) -> dict:
    """OpenAI's usage object."""
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def _token(token_id: int) -> str:
    return f"token_id:{token_id}"


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else -9999.0  # JSON has no -inf; OpenAI's floor


def chat_logprobs(logprobs) -> dict:
    """A chat choice's `logprobs`: per token, its logprob and the top alternatives."""
    return {"content": [
        {"token": _token(lp.token_id), "logprob": _logprob(lp.logprob), "bytes": None,
         "top_logprobs": [{"token": _token(t.token_id), "logprob": _logprob(t.logprob), "bytes": None}
                          for t in lp.top]}
        for lp in logprobs
    ], "refusal": None}


def completion_logprobs(logprobs) -> dict:
    """A completion choice's `logprobs`, in the legacy parallel-lists layout."""
    return {"tokens": [_token(lp.token_id) for lp in logprobs],
            "token_logprobs": [_logprob(lp.logprob) for lp in logprobs],
            "top_logprobs": [{_token(t.token_id): _logprob(t.logprob) for t in lp.top} for lp in logprobs],
            "text_offset": None}


class Answer:
    """A whole generation collected from its events."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.logprobs: list[common_pb2.TokenLogprob] = []
        self.last: generation_pb2.GenerateResponse | None = None

    async def collect(self, generation: Generation) -> Answer:
        """Every event of the generation; Unavailable when it ended without a final event."""
        async with contextlib.aclosing(generation.responses()) as events:
            async for event in events:
                self.texts.append(event.text)
                self.logprobs.extend(event.logprobs)
                self.last = event
        if self.last is None or not self.last.finish_reason:
            raise Unavailable("the generation ended without a final event; retry")
        return self

    @property
    def text(self) -> str:
        """The whole generated text."""
        return "".join(self.texts)


class CompletionShape:
    """/v1/completions: a `text_completion` answer, or one chunk per event with the finish reason on the last."""

    id_prefix = "cmpl-"
    answer_object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, logprobs: bool) -> None:
        self.created = int(time.time())
        self.logprobs = logprobs

    def head(self, generation: Generation, object_: str) -> dict:
        """The fields that every answer and chunk of the generation starts with."""
        return {"id": f"{self.id_prefix}{generation.request_id}", "object": object_, "created": self.created,
                "model": generation.model.id, "system_fingerprint": generation.model.revision or None}

    def answer(self, generation: Generation, answer: Answer) -> dict:
        """The whole answer; raises when the generation ended without one (aborted, expired)."""
        return {**self.head(generation, self.answer_object), "choices": [self.choice(answer)],
                "usage": usage_object(answer.last.usage)}

    def choice(self, answer: Answer) -> dict:
        """The answer's one choice."""
        return {"index": 0, "text": answer.text, "finish_reason": finish_reason(answer.last.finish_reason),
                "logprobs": completion_logprobs(answer.logprobs) if self.logprobs else None}

    def start(self, head: dict) -> Iterator[dict]:
        """The chunks sent before the first event."""
        return iter(())

    def chunks(self, head: dict, event: generation_pb2.GenerateResponse) -> Iterator[dict]:
        """The chunks of one event; raises (after the text) when the generation ended without an answer."""
        finish = _finish(event.finish_reason) if event.finish_reason else None
        failed = isinstance(finish, MeshError)
        if event.text or event.token_ids or (finish and not failed):
            choice = {"index": 0, "text": event.text, "finish_reason": None if failed else finish,
                      "logprobs": completion_logprobs(event.logprobs) if self.logprobs else None}
            yield {**head, "choices": [choice]}
        if failed:
            raise finish


class ChatShape(CompletionShape):
    """/v1/chat/completions: a `chat.completion` answer, or `chat.completion.chunk`s: the role first, then
    content deltas, then an empty delta with the finish reason."""

    id_prefix = "chatcmpl-"
    answer_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def choice(self, answer: Answer) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": answer.text, "refusal": None},
                "finish_reason": finish_reason(answer.last.finish_reason),
                "logprobs": chat_logprobs(answer.logprobs) if self.logprobs else None}

    def start(self, head: dict) -> Iterator[dict]:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        yield {**head, "choices": [choice]}

    def chunks(self, head: dict, event: generation_pb2.GenerateResponse) -> Iterator[dict]:
        if event.text or event.token_ids:
            choice = {"index": 0, "delta": {"content": event.text}, "finish_reason": None,
                      "logprobs": chat_logprobs(event.logprobs) if self.logprobs else None}
            yield {**head, "choices": [choice]}
        if event.finish_reason:
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason(event.finish_reason)}
            yield {**head, "choices": [choice]}


def sse(data: dict) -> str:
    """One server-sent event carrying `data` as compact JSON."""
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


def event_stream(generation: Generation, events: AsyncIterator[generation_pb2.GenerateResponse],
                 first: generation_pb2.GenerateResponse | None, include_usage: bool,
                 shape: CompletionShape) -> EventStream:
    """The streamed answer of a started generation whose first event (`first`) has arrived."""
    return EventStream(_chunks(generation, events, first, include_usage, shape),
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                "X-Request-Id": generation.request_id})


async def _chunks(generation: Generation, events: AsyncIterator[generation_pb2.GenerateResponse],
                  first: generation_pb2.GenerateResponse | None, include_usage: bool,
                  shape: CompletionShape) -> AsyncIterator[str]:
    """The events' chunks, a usage chunk when asked for, then `[DONE]`; an error after the 200 is an event."""
    usage_field = {"usage": None} if include_usage else {}
    try:
        head = shape.head(generation, shape.chunk_object)  # the same for every chunk: built once
        for chunk in shape.start(head):
            yield sse({**chunk, **usage_field})
        event, last = first, None
        while event is not None:
            for chunk in shape.chunks(head, event):
                yield sse({**chunk, **usage_field})
            last, event = event, await anext(events, None)
        if last is None or not last.finish_reason:
            raise Unavailable("the generation ended without a final event; retry")
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage_object(last.usage)})
        yield "data: [DONE]\n\n"
    except Exception as exc:  # after the 200 an error can only be an event
        _, error, _ = error_of(exc)
        yield sse({"error": error})
    finally:
        await events.aclose()  # cancels the generation upstream if it is still running
