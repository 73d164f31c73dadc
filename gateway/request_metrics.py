"""Per-request latency and size histograms, measured where the caller sees them (the gateway), by model.

The generation path calls `observe` once per finished request; the metrics endpoint reads the families at scrape
time. Histograms, unlike "median of recent" gauges, add up across gateway replicas.
"""

from __future__ import annotations

from moemesh.services.core.metrics import (
    LATENCY_BUCKETS,
    TOKEN_COUNT_BUCKETS,
    TOKEN_TIME_BUCKETS,
    Histogram,
)
from moemesh.v1 import common_pb2


class RequestMetrics:
    """Time to first token, time per output token, end-to-end latency, prompt and completion lengths."""

    def __init__(self) -> None:
        self.ttft = Histogram("moemesh_gateway_time_to_first_token_seconds",
                              "Time from a request's arrival at the gateway to its first token.", LATENCY_BUCKETS, "model")
        self.tpot = Histogram("moemesh_gateway_time_per_output_token_seconds",
                              "Time per output token after the first (decode), per request.", TOKEN_TIME_BUCKETS,
                              "model")
        self.e2e = Histogram("moemesh_gateway_request_duration_seconds",
                             "Time from a request's arrival at the gateway to its last event.", LATENCY_BUCKETS, "model")
        self.prompt = Histogram("moemesh_gateway_prompt_tokens", "Prompt tokens per request.", TOKEN_COUNT_BUCKETS,
                                "model")
        self.completion = Histogram("moemesh_gateway_completion_tokens", "Completion tokens per request.",
                                    TOKEN_COUNT_BUCKETS, "model")

    def observe(self, model: str, usage: common_pb2.Usage, timings: common_pb2.Timings) -> None:
        """One finished generation."""
        if usage.completion_tokens:
            self.ttft.observe(timings.time_to_first_token, model)
        if usage.completion_tokens > 1:
            self.tpot.observe(timings.time_per_output_token, model)
        self.e2e.observe(timings.total, model)
        self.prompt.observe(usage.prompt_tokens, model)
        self.completion.observe(usage.completion_tokens, model)

    def families(self) -> list:
        return [h.family() for h in (self.ttft, self.tpot, self.e2e, self.prompt, self.completion)]
