"""Counters the cache tiers keep for their metrics (hits, misses, bypasses, errors, bytes, lookup latency)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

RECENT_LOOKUPS = 256  # lookup latencies kept for the p50 gauges


def recent_latencies() -> collections.deque[float]:
    """A bounded window of recent lookup latencies (seconds), for a median gauge."""
    return collections.deque(maxlen=RECENT_LOOKUPS)


@dataclass
class CacheStats:
    """Counters for one cache tier of the gateway (response or embedding)."""

    hits: int = 0
    misses: int = 0
    bypasses: int = 0  # not cacheable, cache control said no, or the circuit was open
    errors: int = 0
    stores: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    joined: int = 0  # single-flight followers (response cache)
    local_hits: int = 0  # hits served from the gateway's own memory
    lookup_seconds: collections.deque[float] = field(default_factory=recent_latencies)  # for the p50 gauge
