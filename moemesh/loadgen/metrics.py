"""From requests' timings to a load level's figures: throughput, TTFT, TPOT, ITL, end-to-end latency, goodput.

Definitions (as vLLM's `benchmark_serving` and SGLang's `bench_serving` use them):

- TTFT: from sending the request to the first piece of output that carries a token;
- TPOT: per request, (end-to-end - TTFT) / (output tokens - 1); requests of one token have none;
- ITL: every gap between two pieces of streamed output. A piece that carries k tokens (a gRPC event with k
  `token_ids`) contributes k gaps of gap/k, as SGLang does, so that ITL and TPOT weigh tokens alike. The first
  piece's extra tokens arrive with the first token and have no gap of their own;
- end-to-end latency: from sending to the end of the stream;
- throughput: over the level's wall time, from its first request sent to its last one finished.

Times are kept in seconds and reported in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moemesh.loadgen.config import GoodputLimits

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What one request measured. `pieces` are (seconds since sent, tokens) of the output as it streamed."""

    pieces: list[tuple[float, int]] = field(default_factory=list)
    e2e: float = 0.0  # seconds from sending to the end of the stream (or to the error)
    output_tokens: int | None = None  # as the server's usage says; None: count the pieces' tokens
    prompt_tokens: int | None = None  # as the server's usage says
    cached_tokens: int | None = None  # prompt tokens the server took from a prefix cache, when it says
    error_kind: str | None = None  # a gRPC status code name, "HTTP 503", an exception's class, ...
    error_message: str = ""

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    @property
    def generated(self) -> int:
        """Output tokens: the server's count, else the streamed pieces'."""
        return self.output_tokens if self.output_tokens is not None else sum(n for _, n in self.pieces)

    @property
    def ttft(self) -> float | None:
        return self.pieces[0][0] if self.pieces else None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.generated < 2:
            return None
        return (self.e2e - self.ttft) / (self.generated - 1)

    def inter_token_latencies(self) -> list[float]:
        """Every gap between streamed pieces, spread evenly over the tokens of the later piece."""
        gaps = []
        for (before, _), (at, tokens) in zip(self.pieces, self.pieces[1:]):
            gaps.extend([(at - before) / tokens] * tokens)
        return gaps


@dataclass(frozen=True)
class Stats:
    """Mean and percentiles of one figure, in milliseconds; None when nothing was measured."""

    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    count: int = 0


def stats_ms(seconds: list[float]) -> Stats:
    """The mean and p50/p90/p99 (linear interpolation, numpy's default) of durations, in milliseconds."""
    if not seconds:
        return Stats()
    values = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p90, p99 = (float(v) for v in np.percentile(values, PERCENTILES))
    return Stats(mean=float(values.mean()), p50=p50, p90=p90, p99=p99, count=len(values))


@dataclass(frozen=True)
class ErrorSummary:
    """The failed requests of one kind, with the first one's message."""

    count: int
    first_message: str


@dataclass(frozen=True)
class LevelMetrics:
    """The figures of one load level."""

    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # completed requests/s
    output_throughput: float  # output tokens/s
    total_token_throughput: float  # prompt + output tokens/s
    total_output_tokens: int
    total_prompt_tokens: int | None  # None when the server reported no usage
    mean_prompt_tokens: float | None
    total_cached_tokens: int | None  # prompt tokens served from a prefix cache; None when the server does not say
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats
    goodput: float | None  # completed requests/s within the limits; None without limits
    errors: dict[str, ErrorSummary]


def meets(record: RequestRecord, limits: GoodputLimits) -> bool:
    """Whether a completed request is within every limit (a one-token request has no TPOT to break)."""
    checks = ((record.ttft, limits.ttft_ms), (record.tpot, limits.tpot_ms), (record.e2e, limits.e2e_ms))
    return record.ok and all(limit is None or value is None or value * 1000.0 <= limit for value, limit in checks)


def error_summaries(records: list[RequestRecord]) -> dict[str, ErrorSummary]:
    """Failed requests counted by kind, in the order the kinds first appeared."""
    errors: dict[str, ErrorSummary] = {}
    for record in records:
        if not record.ok:
            seen = errors.get(record.error_kind)
            errors[record.error_kind] = ErrorSummary((seen.count if seen else 0) + 1,
                                                     seen.first_message if seen else record.error_message)
    return errors


def level_metrics(records: list[RequestRecord], duration: float, limits: GoodputLimits | None = None) -> LevelMetrics:
    """The figures of a level whose requests are `records` and which lasted `duration` seconds of wall time."""
    done = [r for r in records if r.ok]
    per_second = 1.0 / duration if duration > 0 else 0.0  # no time: nothing was sent
    output_tokens = sum(r.generated for r in done)
    prompt_counts = [r.prompt_tokens for r in done if r.prompt_tokens is not None]
    prompt_tokens = sum(prompt_counts) if prompt_counts else None
    cached_counts = [r.cached_tokens for r in done if r.cached_tokens is not None]
    return LevelMetrics(
        completed=len(done),
        failed=len(records) - len(done),
        duration_s=duration,
        request_throughput=len(done) * per_second,
        output_throughput=output_tokens * per_second,
        total_token_throughput=(output_tokens + (prompt_tokens or 0)) * per_second,
        total_output_tokens=output_tokens,
        total_prompt_tokens=prompt_tokens,
        mean_prompt_tokens=prompt_tokens / len(prompt_counts) if prompt_counts else None,
        total_cached_tokens=sum(cached_counts) if cached_counts else None,
        ttft_ms=stats_ms([r.ttft for r in done if r.ttft is not None]),
        tpot_ms=stats_ms([r.tpot for r in done if r.tpot is not None]),
        itl_ms=stats_ms([gap for r in done for gap in r.inter_token_latencies()]),
        e2e_ms=stats_ms([r.e2e for r in done]),
        goodput=sum(meets(r, limits) for r in done) * per_second if limits else None,
        errors=error_summaries(records),
    )
