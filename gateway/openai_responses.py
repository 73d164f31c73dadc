"""OpenAI response shapes: the whole answer, or its server-sent-event chunks, of a completion or a chat completion.

The two endpoints share one generation path and one streaming loop; a shape says only how an answer and an event
look to the client. A request with several choices runs one generation per choice; their chunks interleave as
the events come, each carrying its choice's `index`. A token in `logprobs` is its text as the tokenizer decodes
it alone (the worker's `TokenLogprob.token`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Iterable, Iterator

import orjson

from moemesh.gateway.deadlines import EventStream
from moemesh.gateway.generation import Generation
from moemesh.gateway.openai_errors import error_of
from moemesh.gateway.tools import Message, ToolCallStream, ToolPolicy
from moemesh.services.core.errors import DeadlineExceeded, MeshError, Unavailable
from moemesh.v1 import common_pb2, generation_pb2

# A choice's open event stream and its first event (None: it ended without one).
Stream = tuple[AsyncIterator[generation_pb2.GenerateResponse], generation_pb2.GenerateResponse | None]


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


def usage_object(usages: Iterable[common_pb2.Usage]) -> dict:
    """OpenAI's usage object, summed over the choices' generations (each counts its own prompt)."""
    usages = list(usages)
    prompt, completion = sum(u.prompt_tokens for u in usages), sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in usages)}}


# ---- logprobs ------------------------------------------------------------------------------------------------------
def _logprob(value: float) -> float:
    return value if math.isfinite(value) else -9999.0  # JSON has no -inf; OpenAI's floor


def _alternative(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": _logprob(logprob), "bytes": list(token.encode())}


def chat_logprobs(logprobs: Iterable[common_pb2.TokenLogprob]) -> dict:
    """A chat choice's `logprobs`: per token, its logprob, its text's UTF-8 bytes and the top alternatives."""
    return {"content": [{**_alternative(lp.token, lp.logprob),
                         "top_logprobs": [_alternative(t.token, t.logprob) for t in lp.top]} for lp in logprobs],
            "refusal": None}


def _top_by_text(lp: common_pb2.TokenLogprob) -> dict[str, float]:
    """The alternatives and the token itself (as vLLM gives them) keyed by text, the best where texts repeat."""
    top: dict[str, float] = {}
    for token, logprob in [*((t.token, t.logprob) for t in lp.top), (lp.token, lp.logprob)]:
        top[token] = max(top.get(token, -math.inf), _logprob(logprob))
    return top


def completion_logprobs(logprobs: Iterable[common_pb2.TokenLogprob],
                        prompt: Iterable[common_pb2.TokenLogprob] = ()) -> dict:
    """A completion choice's `logprobs`, in the legacy parallel-lists layout; an echoed prompt's tokens first,
    the very first with no logprob (nothing precedes it)."""
    prompt = list(prompt)
    entries = [*prompt, *logprobs]
    token_logprobs: list[float | None] = [_logprob(lp.logprob) for lp in entries]
    top: list[dict | None] = [_top_by_text(lp) for lp in entries]
    if prompt:
        token_logprobs[0] = top[0] = None
    return {"tokens": [lp.token for lp in entries], "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": None}


# ---- whole answers -------------------------------------------------------------------------------------------------
class Answer:
    """A whole generation collected from its events."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.logprobs: list[common_pb2.TokenLogprob] = []
        self.prompt_logprobs: list[common_pb2.TokenLogprob] = []
        self.last: generation_pb2.GenerateResponse | None = None

    async def collect(self, generation: Generation) -> Answer:
        """Every event of the generation; Unavailable when it ended without a final event."""
        async with contextlib.aclosing(generation.responses()) as events:
            async for event in events:
                if self.last is None:
                    self.prompt_logprobs = list(event.prompt_logprobs)
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
    """/v1/completions: a `text_completion` answer, or one chunk per event with the finish reason on the last;
    choice i echoes `echoes[i]` (its prompt, or "") before its text."""

    id_prefix = "cmpl-"
    answer_object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, echoes: list[str], logprobs: bool) -> None:
        self.created = int(time.time())
        self.echoes = echoes
        self.logprobs = logprobs
        self.started: set[int] = set()  # choices whose first event was streamed

    def head(self, generation: Generation, object_: str) -> dict:
        """The fields that every answer and chunk of the request starts with (the first choice's ids)."""
        return {"id": f"{self.id_prefix}{generation.request_id}", "object": object_, "created": self.created,
                "model": generation.model.id, "system_fingerprint": generation.model.revision or None}

    def answer(self, generations: list[Generation], answers: list[Answer]) -> dict:
        """The whole answer; raises when a generation ended without one (aborted, expired)."""
        return {**self.head(generations[0], self.answer_object),
                "choices": [self.choice(i, answer) for i, answer in enumerate(answers)],
                "usage": usage_object(answer.last.usage for answer in answers)}

    def choice(self, index: int, answer: Answer) -> dict:
        """Choice `index` of the answer."""
        echo = self.echoes[index]
        logprobs = completion_logprobs(answer.logprobs, answer.prompt_logprobs if echo else ())
        return {"index": index, "text": echo + answer.text, "finish_reason": finish_reason(answer.last.finish_reason),
                "logprobs": logprobs if self.logprobs else None}

    def start(self, head: dict) -> Iterator[dict]:
        """The chunks sent before the first event."""
        return iter(())

    def chunks(self, head: dict, index: int, event: generation_pb2.GenerateResponse) -> Iterator[dict]:
        """The chunks of one event of choice `index`: its echoed prompt first; raises (after the text) when the
        generation ended without an answer."""
        if index not in self.started:
            self.started.add(index)
            if self.echoes[index]:
                logprobs = completion_logprobs((), event.prompt_logprobs) if self.logprobs else None
                yield {**head, "choices": [{"index": index, "text": self.echoes[index], "finish_reason": None,
                                            "logprobs": logprobs}]}
        finish = _finish(event.finish_reason) if event.finish_reason else None
        failed = isinstance(finish, MeshError)
        if event.text or event.token_ids or (finish and not failed):
            choice = {"index": index, "text": event.text, "finish_reason": None if failed else finish,
                      "logprobs": completion_logprobs(event.logprobs) if self.logprobs else None}
            yield {**head, "choices": [choice]}
        if failed:
            raise finish


class ChatShape(CompletionShape):
    """/v1/chat/completions: a `chat.completion` answer, or `chat.completion.chunk`s: each choice's role first,
    then content (or tool-call) deltas, then an empty delta with the finish reason."""

    id_prefix = "chatcmpl-"
    answer_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, choices: int, logprobs: bool, tools: ToolPolicy) -> None:
        super().__init__([""] * choices, logprobs)
        self.tools = tools
        self.streams: dict[int, ToolCallStream] = {}

    def choice(self, index: int, answer: Answer) -> dict:
        finish = finish_reason(answer.last.finish_reason)
        message = self.tools.parse(answer.text) if self.tools.parses_calls else Message(answer.text, [])
        body = {"role": "assistant", "content": message.content, "refusal": None}
        if message.tool_calls:
            body["tool_calls"] = [call.as_object() for call in message.tool_calls]
        return {"index": index, "message": body, "finish_reason": _with_calls(finish, message),
                "logprobs": chat_logprobs(answer.logprobs) if self.logprobs else None}

    def start(self, head: dict) -> Iterator[dict]:
        for index in range(len(self.echoes)):  # in index order, as the SDK builds its choices
            delta = {"role": "assistant", "content": ""}
            if self.tools.parses_calls:
                self.streams[index] = self.tools.stream()
                delta = self.streams[index].start()
            yield {**head, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]}

    def chunks(self, head: dict, index: int, event: generation_pb2.GenerateResponse) -> Iterator[dict]:
        stream = self.streams.get(index)
        if stream is not None:
            delta = stream.feed(event.text)  # may hold text back: {} then
        else:
            delta = {"content": event.text} if event.text or event.token_ids else {}
        if delta or (self.logprobs and event.logprobs):
            yield {**head, "choices": [{"index": index, "delta": delta, "finish_reason": None,
                                        "logprobs": chat_logprobs(event.logprobs) if self.logprobs else None}]}
        if not event.finish_reason:
            return
        finish = finish_reason(event.finish_reason)
        if stream is not None:
            deltas, message = stream.end()
            for delta in deltas:
                yield {**head, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]}
            finish = _with_calls(finish, message)
        yield {**head, "choices": [{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}]}


def _with_calls(finish: str, message: Message) -> str:
    """OpenAI's finish reason of a message: tool_calls for calls that ended normally (length stays length: the
    calls may be cut short)."""
    return "tool_calls" if message.tool_calls and finish == "stop" else finish


# ---- streaming -----------------------------------------------------------------------------------------------------
def sse(data: dict) -> str:
    """One server-sent event carrying `data` as compact JSON."""
    return f"data: {orjson.dumps(data).decode()}\n\n"  # compact UTF-8, as json.dumps with those options, 10x faster


def event_stream(generations: list[Generation], streams: list[Stream], include_usage: bool,
                 shape: CompletionShape) -> EventStream:
    """The streamed answer of started generations (one per choice) whose first events have arrived."""
    return EventStream(_chunks(generations, streams, include_usage, shape),
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                "X-Request-Id": generations[0].request_id})


async def _chunks(generations: list[Generation], streams: list[Stream], include_usage: bool,
                  shape: CompletionShape) -> AsyncIterator[str]:
    """The events' chunks, a usage chunk when asked for, then `[DONE]`; an error after the 200 is an event."""
    usage_field = {"usage": None} if include_usage else {}
    events = merged_events(streams)
    try:
        head = shape.head(generations[0], shape.chunk_object)  # the same for every chunk: built once
        for chunk in shape.start(head):
            yield sse({**chunk, **usage_field})
        lasts: dict[int, generation_pb2.GenerateResponse] = {}
        async for index, event in events:
            for chunk in shape.chunks(head, index, event):
                yield sse({**chunk, **usage_field})
            lasts[index] = event
        if len(lasts) < len(streams) or not all(last.finish_reason for last in lasts.values()):
            raise Unavailable("the generation ended without a final event; retry")
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage_object(last.usage for last in lasts.values())})
        yield "data: [DONE]\n\n"
    except Exception as exc:  # after the 200 an error can only be an event
        _, error, _ = error_of(exc)
        yield sse({"error": error})
    finally:
        await events.aclose()  # cancels the generations upstream that are still running


_END = object()


async def merged_events(streams: list[Stream]) -> AsyncIterator[tuple[int, generation_pb2.GenerateResponse]]:
    """(choice index, event) of every stream: the first events in index order, then as they arrive; the first
    error ends it. Closing it closes every stream (cancelling their generations upstream)."""
    if len(streams) == 1:  # no tasks for the common case
        events, event = streams[0]
        try:
            while event is not None:
                yield 0, event
                event = await anext(events, None)
        finally:
            await events.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue(maxsize=4 * len(streams))
    pumps: list[asyncio.Task] = []

    async def pump(index: int, events: AsyncIterator) -> None:
        try:
            async for event in events:
                await queue.put((index, event))
            await queue.put((index, _END))
        except Exception as exc:  # handed to the reader, which raises it
            await queue.put((index, exc))

    try:
        running = 0
        for index, (_, first) in enumerate(streams):
            if first is not None:
                yield index, first
                running += 1
        pumps = [asyncio.create_task(pump(i, events)) for i, (events, first) in enumerate(streams) if first is not None]
        while running:
            index, item = await queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for events, _ in streams:
            await events.aclose()
