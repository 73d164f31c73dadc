"""The scheduler's admission queue: bounded, prioritised, fair among tenants.

Requests wait here until a replica has room. The queue is bounded twice, by
requests and by estimated tokens; a request beyond either bound is refused at
once with RESOURCE_EXHAUSTED and a retry-after hint, so an overload costs
callers a fast error instead of an unbounded wait and the scheduler's memory
stays flat.

Order: higher `priority` first; within a priority, start-time fair queuing
weighted by tokens. Each request gets a virtual finish tag
`max(virtual clock, tenant's last tag) + cost / weight`, and the smallest tag
goes next, so a tenant that floods the queue only delays its own requests:
another tenant's request is tagged as if the flood were not there. Failover
retries jump the queue (they already hold a client's stream).

The dispatcher may serve requests out of this order (`ahead` and `take`): a
request that cannot be placed now lets a bounded number of later ones
overtake it (see dispatcher.py); `Pending.bypassed` counts them.

Plain data and no I/O: the dispatcher owns one per model.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from moemesh.services.core.errors import Overloaded

RETRY_PRIORITY = 1 << 30  # failover retries go before any client priority


@dataclass(eq=False)
class Pending:
    """One queued request and what ordering needs of it."""

    request_id: str
    tenant: str
    priority: int
    cost: int  # estimated tokens: prompt plus max new tokens
    deadline: float | None = None  # Unix seconds; None = none
    payload: Any = None  # the dispatcher's own record
    enqueued_at: float = 0.0
    finish_tag: float = 0.0
    removed: bool = False
    bypassed: int = 0  # later requests dispatched before it while it could not be placed
    _order: int = field(default=0, repr=False)


@dataclass(frozen=True)
class QueueLimits:
    max_requests: int
    max_tokens: int
    tenant_weights: dict[str, float] = field(default_factory=dict)  # default weight 1.0


class AdmissionQueue:
    """Priority classes, each fair-queued among tenants by token cost."""

    def __init__(self, limits: QueueLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._heap: list[tuple[int, float, int, Pending]] = []
        self._by_id: dict[str, Pending] = {}
        self._last_tag: dict[tuple[int, str], float] = {}  # (priority, tenant) -> last finish tag
        self._virtual: dict[int, float] = {}  # priority -> virtual clock (tag of the last popped request)
        self._counter = itertools.count()
        self.tokens = 0
        self.rejected = 0
        self._stale = 0  # removed entries still in the heap

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    def push(self, item: Pending, retry_after: float = 1.0, force: bool = False) -> None:
        """Queue `item`; Overloaded (nothing queued) when a bound would be passed, unless `force` (retries)."""
        if not force:
            if len(self._by_id) + 1 > self.limits.max_requests:
                self.rejected += 1
                raise Overloaded(f"queue full: {len(self._by_id)} requests waiting (limit {self.limits.max_requests})",
                                 retry_after=retry_after)
            if self.tokens + item.cost > self.limits.max_tokens:
                self.rejected += 1
                raise Overloaded(f"queue full: {self.tokens} tokens waiting, this request needs {item.cost} "
                                 f"(limit {self.limits.max_tokens})", retry_after=retry_after)
        weight = self.limits.tenant_weights.get(item.tenant, 1.0)
        key = (item.priority, item.tenant)
        start = max(self._virtual.get(item.priority, 0.0), self._last_tag.get(key, 0.0))
        item.finish_tag = start + item.cost / weight
        self._last_tag[key] = item.finish_tag
        item.enqueued_at = self.clock()
        item._order = next(self._counter)
        self._by_id[item.request_id] = item
        self.tokens += item.cost
        heapq.heappush(self._heap, (-item.priority, item.finish_tag, item._order, item))

    def peek(self) -> Pending | None:
        """The next request, left in place."""
        while self._heap and self._heap[0][3].removed:
            heapq.heappop(self._heap)
            self._stale = max(0, self._stale - 1)
        return self._heap[0][3] if self._heap else None

    def pop(self) -> Pending | None:
        """Take the next request (highest priority, then smallest finish tag)."""
        item = self.peek()
        if item is None:
            return None
        heapq.heappop(self._heap)
        self._virtual[item.priority] = max(self._virtual.get(item.priority, 0.0), item.finish_tag)
        self._forget(item)
        return item

    def ahead(self, limit: int) -> list[Pending]:
        """The first `limit` queued requests in the order `pop` would give them, left in place."""
        entries = heapq.nsmallest(limit + self._stale, self._heap)
        return [entry[3] for entry in entries if not entry[3].removed][:limit]

    def take(self, item: Pending) -> None:
        """Take a queued request out of order (served: its tag counts as `pop` would count it)."""
        if item is self.peek():
            self.pop()
            return
        self._virtual[item.priority] = max(self._virtual.get(item.priority, 0.0), item.finish_tag)
        self._discard(item)

    def remove(self, request_id: str) -> Pending | None:
        """Drop a queued request (cancelled); None if it is not queued."""
        item = self._by_id.get(request_id)
        if item is not None:
            key = (item.priority, item.tenant)
            if self._last_tag.get(key) == item.finish_tag:  # it was the tenant's latest: give its share back
                self._last_tag[key] = item.finish_tag - item.cost / self.limits.tenant_weights.get(item.tenant, 1.0)
            self._discard(item)
        return item

    def _discard(self, item: Pending) -> None:
        """Forget a request that is not the head; its heap entry goes lazily."""
        item.removed = True
        self._forget(item)
        self._stale += 1
        if self._stale > max(8, len(self._by_id)):
            # Rebuild without the removed entries, so cancelled work never piles up behind a stuck head.
            self._heap = [entry for entry in self._heap if not entry[3].removed]
            heapq.heapify(self._heap)
            self._stale = 0

    def expired(self, now_unix: float) -> list[Pending]:
        """Remove and return every request whose deadline has passed."""
        late = [item for item in self._by_id.values() if item.deadline is not None and item.deadline <= now_unix]
        for item in late:
            self.remove(item.request_id)
        return late

    def oldest_wait(self) -> float:
        """Seconds the longest-waiting request has been queued (0 when empty)."""
        if not self._by_id:
            return 0.0
        return self.clock() - min(item.enqueued_at for item in self._by_id.values())

    def __iter__(self) -> Iterator[Pending]:
        return iter(list(self._by_id.values()))

    def _forget(self, item: Pending) -> None:
        if self._by_id.pop(item.request_id, None) is not None:
            self.tokens -= item.cost
        if not self._by_id:
            # Idle: restart the clocks so tags do not grow without bound.
            self._last_tag.clear()
            self._virtual.clear()
