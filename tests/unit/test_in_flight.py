"""gateway.in_flight: each tenant's requests in progress against its max_concurrent_requests (through a real mesh:
tests/integration/test_tenants_e2e.py)."""

from __future__ import annotations

import pytest

from moemesh.gateway.in_flight import RETRY_AFTER, InFlight
from moemesh.gateway.tenants import Tenant
from moemesh.services.core.errors import RateLimited


def test_a_tenant_holds_at_most_its_limit_and_each_release_counts_once():
    counts = InFlight()
    acme, other = Tenant(id="acme", max_concurrent_requests=2), Tenant(id="other", max_concurrent_requests=1)
    first, second = counts.acquire(acme), counts.acquire(acme)
    with pytest.raises(RateLimited) as caught:
        counts.acquire(acme)
    assert caught.value.retry_after == RETRY_AFTER
    assert str(caught.value) == "tenant 'acme' has 2 requests in progress, its limit (max_concurrent_requests); " \
                               "retry when one ends"
    counts.acquire(other)  # another tenant's count is its own
    first()
    first()  # idempotent: a request ends once
    assert counts.counts == {"acme": 1, "other": 1}
    third = counts.acquire(acme)
    second()
    third()
    assert "acme" not in counts.counts, "a tenant with nothing in progress leaves no entry"


def test_a_tenant_without_a_limit_is_not_counted():
    counts = InFlight()
    releases = [counts.acquire(Tenant(id="open")) for _ in range(1000)]
    assert counts.counts == {}
    for release in releases:
        release()


def test_the_limit_is_at_least_one():
    with pytest.raises(ValueError, match="max_concurrent_requests"):
        Tenant(id="x", max_concurrent_requests=0)
