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

from moemesh.worker.engine.engine import Engine
from moemesh.worker.engine.requests import GenerationRequest, RequestOutput

log = logging.getLogger(__name__)

T = TypeVar("T")

STATS_WINDOW = 5.0  # seconds over which steps_per_second is averaged

# A subscriber receives every output of its requests for one step, at once.
Subscriber = Callable[[list[RequestOutput]], None]


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
        self._wake = threading.Event()
        self._subscribers: dict[str, Subscriber] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_progress = time.monotonic()
        self._step_times: collections.deque[float] = collections.deque()

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
        if self._thread is None:
            self.launch()

    def call(self, fn: Callable[..., T], *args) -> asyncio.Future[T]:
        """Run `fn(*args)` on the engine thread between steps; the future gets its result or exception."""
        future = self._loop.create_future()
        self._send("call", (fn, args, future))
        return future

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def submit(self, request: GenerationRequest, subscriber: Subscriber) -> None:
        """Queue a request; raises InvalidRequest at once if it cannot fit."""
        self.engine.check(request)
        self._subscribers[request.request_id] = subscriber
        self.idle.clear()
        self._send("add", request)

    def abort(self, request_id: str, reason: str = "abort") -> None:
        self._send("abort", (request_id, reason))

    @property
    def in_flight(self) -> int:
        return len(self._subscribers)

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
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self.engine.add(payload)  # type: ignore[arg-type]
            elif kind == "call":
                self._run_call(*payload)  # type: ignore[misc]
            else:
                self.engine.abort(*payload)  # type: ignore[misc]

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
        self._run()

    def _run(self) -> None:
        while not self._stopping:
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
            subscriber(batch)
        if not self._subscribers:
            self.idle.set()


def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    if future.done():
        return  # the caller gave up (cancelled)
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
