"""Runs the engine on its own thread and bridges it to asyncio.

The event loop only moves messages: it hands additions and aborts to the
engine thread through a queue, and the engine thread hands back each step's
outputs, grouped by the subscriber that submitted them (one batch per
subscriber per step).

All of the process's tensor work happens on the engine thread: the model is
built there and other model calls (embeddings) are queued to it with
`call`. PyTorch's CPU thread pool (OpenMP) is per calling thread, and as
soon as a second thread runs parallel kernels the two pools contend for the
cores: measured here, the engine ran at half speed once the main thread had
done a single parallel matmul.

Failures stay where they belong: a request the engine refuses while adding
it gets that request's error; an exception in a step is an engine failure
(its state is unknown, so nothing more runs on it): new work is refused with
UNAVAILABLE, `failed` is set for the process to report itself unhealthy and
exit, and `fail_in_flight` hands every in-flight request UNAVAILABLE so the
scheduler continues it on another replica.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from moemesh.services.core.errors import InternalError, MeshError, Unavailable
from moemesh.worker.engine.engine import Engine
from moemesh.worker.engine.requests import GenerationRequest, RequestOutput

log = logging.getLogger(__name__)

T = TypeVar("T")

STATS_WINDOW = 5.0  # seconds over which steps_per_second is averaged



@dataclass(frozen=True, eq=False)
class Subscriber:
    """Where a request's results go: every output of its requests for one step at once, or a request's error."""

    deliver: Callable[[list[RequestOutput]], None]
    fail: Callable[[str, MeshError], None]


class EngineFailed(RuntimeError):
    """The engine loop raised: the worker must report itself unhealthy and exit (its requests fail over)."""


@dataclass
class EngineStats:
    """Load figures for heartbeats."""

    running: int = 0
    waiting: int = 0
    steps_per_second: float = 0.0
    seconds_since_progress: float = 0.0


class EngineRunner:
    """Owns the engine thread; ``submit``/``abort`` are called from the event loop."""

    def __init__(self, build: Callable[[], Engine]) -> None:
        self._build = build
        self.engine: Engine | None = None
        self._build_error: BaseException | None = None
        self._built = threading.Event()
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._calls: collections.deque[tuple] = collections.deque()  # taken from the inbox, not yet run (engine thread)
        self._wake = threading.Event()
        self._subscribers: dict[str, Subscriber] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_progress = time.monotonic()
        self._step_times: collections.deque[float] = collections.deque()
        self.failure: BaseException | None = None  # what the engine loop raised; set once, on the engine thread

    def launch(self) -> Engine:
        """Start the engine thread, build the engine there, and return it (raising what the build raised)."""
        self._thread = threading.Thread(target=self._main, name="engine", daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error
        return self.engine

    def start(self) -> None:
        """Attach to the running event loop: from now on requests may be submitted."""
        self._loop = asyncio.get_running_loop()
        self.idle = asyncio.Event()  # set while no request is in flight
        self.idle.set()
        self.failed = asyncio.Event()  # set once the engine loop has failed (see `failure`)
        self.in_flight_failed = asyncio.Event()  # set by `fail_in_flight`: the execution streams may end
        if self._thread is None:
            self.launch()

    def call(self, fn: Callable[..., T], *args) -> asyncio.Future[T]:
        """Run `fn(*args)` on the engine thread between steps; the future gets its result or exception."""
        future = self._loop.create_future()
        if self.failure is not None:
            future.set_exception(self._unavailable())
            return future
        self._send("call", (fn, args, future))
        return future

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def submit(self, request: GenerationRequest, subscriber: Subscriber) -> None:
        """Queue a request; raises InvalidRequest at once if it cannot fit, Unavailable once the engine failed."""
        if self.failure is not None:
            raise self._unavailable()
        self.engine.check(request)
        self._subscribers[request.request_id] = subscriber
        self.idle.clear()
        self._send("add", request)

    def abort(self, request_id: str, reason: str = "abort") -> None:
        self._send("abort", (request_id, reason))

    def fail(self, error: BaseException) -> None:
        """Fail the engine from outside (an expert shard of this replica was lost): the engine thread raises
        `error` before its next step and takes the engine-failure path, as if the step had raised it."""
        self._send("fail", error)

    @property
    def in_flight(self) -> int:
        return len(self._subscribers)

    def fail_in_flight(self) -> int:
        """After an engine failure: every in-flight request gets UNAVAILABLE (retryable elsewhere); returns how many."""
        failed, self._subscribers = self._subscribers, {}
        error = self._unavailable()
        for request_id, subscriber in failed.items():
            _guarded(subscriber.fail, request_id, error)
        self.idle.set()
        self.in_flight_failed.set()
        return len(failed)

    def _unavailable(self) -> Unavailable:
        return Unavailable(f"the engine of this worker failed ({type(self.failure).__name__}); retry on another "
                           "replica")

    def stats(self) -> EngineStats:
        now = time.monotonic()
        busy = self.in_flight > 0
        return EngineStats(
            running=self.engine.num_running,
            waiting=self.engine.num_waiting,
            steps_per_second=sum(1 for t in tuple(self._step_times) if now - t < STATS_WINDOW) / STATS_WINDOW,
            seconds_since_progress=(now - self._last_progress) if busy else 0.0,
        )

    # ---- engine thread -----------------------------------------------------
    def _send(self, kind: str, payload: object) -> None:
        self._inbox.put((kind, payload))
        self._wake.set()

    def _drain_inbox(self) -> None:
        """Take every message in; then run the queued calls: one while the engine has requests (a step runs
        between two calls, so a run of calls, a large embedding batch's forward passes, delays the generating
        streams by one call at a time), all of them otherwise."""
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self._add(payload)  # type: ignore[arg-type]
            elif kind == "call":
                self._calls.append(payload)  # type: ignore[arg-type]
            elif kind == "fail":
                raise payload  # type: ignore[misc]
            else:
                self.engine.abort(*payload)  # type: ignore[misc]
        while self._calls:
            self._run_call(*self._calls.popleft())
            if self.engine.has_work():
                return

    def _add(self, request: GenerationRequest) -> None:
        """Add one request; a refusal is that request's error, never the engine's."""
        try:
            self.engine.add(request)
        except Exception as exc:  # the engine checked nothing else yet: only this request is affected
            if not isinstance(exc, MeshError):
                log.exception("adding request %s failed", request.request_id)
                exc = InternalError(f"internal error: the engine could not admit it ({type(exc).__name__})")
            self._loop.call_soon_threadsafe(self._reject, request.request_id, exc)

    def _run_call(self, fn: Callable, args: tuple, future: asyncio.Future) -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            self._loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            self._loop.call_soon_threadsafe(_settle, future, result, None)

    def _main(self) -> None:
        try:
            self.engine = self._build()
        except BaseException as exc:  # re-raised by launch() in the starting thread
            self._build_error = exc
            return
        finally:
            self._built.set()
        try:
            self._run()
        except BaseException as exc:  # the engine's state is unknown now: it stops, and the process reports it
            log.exception("engine loop failed; this worker stops taking work")
            self.failure = exc
            self._refuse_queued_calls()
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self.failed.set)

    def _refuse_queued_calls(self) -> None:
        """Calls (embeddings) still queued for the failed engine get UNAVAILABLE; queued adds fail with the rest."""
        while self._calls:
            self._loop.call_soon_threadsafe(_settle, self._calls.popleft()[2], None, self._unavailable())
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "call":
                self._loop.call_soon_threadsafe(_settle, payload[2], None, self._unavailable())

    def _run(self) -> None:
        while not self._stopping:
            if not self._calls:  # calls left over from a drain run without waiting for news
                self._wake.wait()
            self._wake.clear()
            self._drain_inbox()
            while self.engine.has_work() and not self._stopping:
                outputs = self.engine.step()
                self._record_progress()
                self._loop.call_soon_threadsafe(self._deliver, outputs)
                self._drain_inbox()

    def _record_progress(self) -> None:
        now = time.monotonic()
        self._last_progress = now
        self._step_times.append(now)
        while now - self._step_times[0] > STATS_WINDOW:
            self._step_times.popleft()

    # ---- event loop --------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_subscriber: dict[int, tuple[Subscriber, list[RequestOutput]]] = {}
        for output in outputs:
            subscriber = self._subscribers.get(output.request_id)
            if subscriber is None:
                continue
            if output.finish_reason is not None:
                del self._subscribers[output.request_id]
            by_subscriber.setdefault(id(subscriber), (subscriber, []))[1].append(output)
        for subscriber, batch in by_subscriber.values():
            _guarded(subscriber.deliver, batch)
        if not self._subscribers:
            self.idle.set()

    def _reject(self, request_id: str, error: MeshError) -> None:
        """A request the engine refused while adding it: its subscriber gets the error."""
        subscriber = self._subscribers.pop(request_id, None)
        if subscriber is not None:
            _guarded(subscriber.fail, request_id, error)
        if not self._subscribers:
            self.idle.set()


def _guarded(fn: Callable, *args) -> None:
    """Call one subscriber; its bug is logged and must not keep the others' outputs from them."""
    try:
        fn(*args)
    except Exception:
        log.exception("a subscriber of the engine runner failed")


def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    if future.done():
        return  # the caller gave up (cancelled)
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
