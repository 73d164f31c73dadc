"""Running the benchmark: each target in turn, its warm-up, then each load level in a closed or an open loop.

A level ends by itself: after `requests` requests, or once `duration` seconds have passed since its start (no
request is sent after that; those in flight finish, each within the request timeout). Level k sends prompts
numbers k * LEVEL_STRIDE onwards of its target's stream, and no level re-sends a prompt of another one, so a
server's prefix cache does not carry whole prompts from one level (or target) to the next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from rich.progress import Progress

from moemesh.loadgen.clients import BenchClient, ModelNotFound, RequestSpec, open_client
from moemesh.loadgen.config import BenchConfig, LoadLevel, Target
from moemesh.loadgen.dataset import Dataset, PreparedPrompts
from moemesh.loadgen.metrics import ErrorSummary, LevelMetrics, RequestRecord, error_summaries, level_metrics
from moemesh.loadgen.schedule import poisson_arrivals

LEVEL_STRIDE = 1_000_000  # prompt numbers set aside for each level
Send = Callable[[int], Awaitable[RequestRecord]]


@dataclass(frozen=True)
class LevelResult:
    """One load level's figures."""

    level: LoadLevel
    metrics: LevelMetrics


@dataclass
class TargetResult:
    """Everything measured on one target; `error` says why nothing was, when nothing was."""

    target: Target
    model: str | None = None
    levels: list[LevelResult] = field(default_factory=list)
    warmup_errors: dict[str, ErrorSummary] = field(default_factory=dict)
    error: str | None = None

    @property
    def failed_requests(self) -> int:
        return sum(result.metrics.failed for result in self.levels)


class RequestBudget:
    """Hands out prompt numbers until `requests` are taken or `duration` seconds have passed."""

    def __init__(self, first_index: int, requests: int | None, duration: float | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.next_index = first_index
        self.remaining = requests
        self.clock = clock
        self.deadline = clock() + duration if duration is not None else None

    @property
    def expired(self) -> bool:
        return self.deadline is not None and self.clock() >= self.deadline

    def take(self) -> int | None:
        """The next prompt number, or None when the budget is spent."""
        if self.remaining == 0 or self.expired:
            return None
        if self.remaining is not None:
            self.remaining -= 1
        self.next_index += 1
        return self.next_index - 1


async def closed_loop(send: Send, concurrency: int, budget: RequestBudget) -> list[RequestRecord]:
    """`concurrency` requests in flight: each one that ends is replaced by the next until the budget is spent."""
    records: list[RequestRecord] = []

    async def user() -> None:
        while (index := budget.take()) is not None:
            records.append(await send(index))

    await asyncio.gather(*(user() for _ in range(concurrency)))
    return records


async def open_loop(send: Send, rate: float, seed: int, budget: RequestBudget) -> list[RequestRecord]:
    """Requests sent at Poisson arrival times whatever is in flight, until the budget is spent; then wait for all."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent: list[asyncio.Task] = []
    for offset in poisson_arrivals(rate, seed):
        index = budget.take()
        if index is None:
            break
        await asyncio.sleep(max(0.0, start + offset - loop.time()))  # the schedule, not a poll
        if budget.expired:
            break
        sent.append(asyncio.create_task(send(index)))
    return list(await asyncio.gather(*sent))


async def run_level(send: Send, level: LoadLevel, budget: RequestBudget, seed: int) -> tuple[list[RequestRecord], float]:
    """One level's records and its wall time, from its start to its last request's end."""
    start = time.perf_counter()
    if level.mode == "concurrency":
        records = await closed_loop(send, int(level.value), budget)
    else:
        records = await open_loop(send, level.value, seed, budget)
    return records, time.perf_counter() - start


def sender(client: BenchClient, dataset: Dataset, spec: RequestSpec, stream: str,
           on_done: Callable[[], None] = lambda: None) -> Send:
    """Send prompt number i of `stream` through `client`, then call `on_done`."""
    async def send(index: int) -> RequestRecord:
        record = await client.send(dataset.prompt(index, stream), spec, index)
        on_done()
        return record

    return send


async def warm_up(client: BenchClient, dataset: PreparedPrompts, spec: RequestSpec,
                  count: int) -> dict[str, ErrorSummary]:
    """Send `count` warm-up prompts at once and wait for them; what failed, by kind."""
    dataset.prepare("warmup", 0, count)
    records = await closed_loop(sender(client, dataset, spec, "warmup"), count, RequestBudget(0, count, None))
    return error_summaries(records)


async def measure_level(config: BenchConfig, number: int, client: BenchClient, dataset: PreparedPrompts,
                        spec: RequestSpec, progress: Progress, stream: str = "bench") -> LevelResult:
    """Level `number` of the sweep on one target, with its own bar in `progress`, prompts from `stream`."""
    level, first_index = config.levels[number], number * LEVEL_STRIDE
    if config.requests is not None:  # with a duration alone, prompts are built as they are sent
        dataset.prepare(stream, first_index, config.requests)
    task = progress.add_task(f"{client.target.url} {level.label}", total=config.requests)
    send = sender(client, dataset, spec, stream, lambda: progress.advance(task))
    budget = RequestBudget(first_index, config.requests, config.duration)
    records, duration = await run_level(send, level, budget, config.seed)
    return LevelResult(level, level_metrics(records, duration, config.goodput))


async def run_target(config: BenchConfig, target: Target, dataset: PreparedPrompts, progress: Progress,
                     stream: str = "bench") -> TargetResult:
    """Warm up, then measure every level of `config` on one target, its prompts from `stream`."""
    result = TargetResult(target)
    async with open_client(target, config.api_key) as client:
        try:
            result.model = config.model or await client.default_model()
        except ModelNotFound as exc:
            result.error = str(exc)
            return result
        spec = RequestSpec(result.model, config.dataset.output_tokens, config.temperature, config.seed,
                           config.allow_cache, config.timeout)
        if config.warmup:
            result.warmup_errors = await warm_up(client, dataset, spec, config.warmup)
        for number in range(len(config.levels)):
            result.levels.append(await measure_level(config, number, client, dataset, spec, progress, stream))
    return result


async def run_bench(config: BenchConfig, dataset: PreparedPrompts, progress: Progress) -> list[TargetResult]:
    """Measure each target in turn: synthetic prompts of the same lengths, drawn afresh for each target (two
    targets may be one server's two front doors, and the second would find the first's prompts in its prefix
    cache); a prompt file's lines, the same for every target."""
    return [await run_target(config, target, dataset, progress, stream="bench" if i == 0 else f"bench{i}")
            for i, target in enumerate(config.targets)]
