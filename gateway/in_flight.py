"""Per-tenant concurrency: how many requests a tenant may have in progress at once on this gateway.

A tenant's `max_concurrent_requests` (the tenants file; unset: no limit) bounds its generations (each choice of
a request counts, a journal follower too) and embedding calls in progress on one gateway. The rate limits bound
how often a tenant starts work, and its tokens per minute how much; this bounds how much it holds at a time, so
that a batch job opening hundreds of long streams cannot hold every sequence slot of the mesh while interactive
tenants wait. A request over the limit is refused at once with RESOURCE_EXHAUSTED / 429 and a Retry-After of a
second; nothing is charged. The count is this gateway's own (in process, exact, no Redis round trip): behind N
gateway replicas a tenant may hold up to N times its limit.
"""

from __future__ import annotations

from collections.abc import Callable

from moemesh.gateway.tenants import Tenant
from moemesh.services.core.errors import RateLimited

RETRY_AFTER = 1.0  # seconds a refused caller is told to wait: streams end on their own time, not a refill rate


class InFlight:
    """Each tenant's requests in progress on this gateway (event loop only)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def acquire(self, tenant: Tenant) -> Callable[[], None]:
        """Count one more request of `tenant` and return the call that ends it (idempotent); RateLimited if the
        tenant already has `max_concurrent_requests` in progress."""
        limit = tenant.max_concurrent_requests
        if limit is None:
            return _nothing
        held = self.counts.get(tenant.id, 0)
        if held >= limit:
            raise RateLimited(f"tenant {tenant.id!r} has {held} requests in progress, its limit "
                              f"(max_concurrent_requests); retry when one ends", retry_after=RETRY_AFTER)
        self.counts[tenant.id] = held + 1
        ended = False

        def release() -> None:
            nonlocal ended
            if ended:
                return
            ended = True
            left = self.counts[tenant.id] - 1
            if left:
                self.counts[tenant.id] = left
            else:
                del self.counts[tenant.id]

        return release


def _nothing() -> None:
    """The release of a request no limit counted."""
