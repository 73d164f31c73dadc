"""Scheduler configuration."""

from __future__ import annotations

from typing import ClassVar

import pydantic

from moemesh.services.core.config import ServiceConfig
from moemesh.services.scheduler.dispatcher import DispatchPolicy


class SchedulerConfig(ServiceConfig):
    """Registry timing, network and auth settings of the scheduler."""

    ENV_PREFIX: ClassVar[str] = "MOEMESH_SCHEDULER_"

    host: str = "127.0.0.1"
    port: int = pydantic.Field(default=0, ge=0, le=65535)
    # Seconds between worker heartbeats (told to workers when they register).
    heartbeat_interval: float = pydantic.Field(default=1.0, gt=0, le=60)
    # Heartbeat intervals a node may miss before it is evicted.
    max_missed_heartbeats: int = pydantic.Field(default=3, ge=1, le=100)
    # Workers must present this token (metadata `authorization: Bearer ...`); None = open.
    cluster_token: str | None = None
    grace: float = pydantic.Field(default=10.0, ge=0)
    # Admission queue bounds, per model: beyond either, RESOURCE_EXHAUSTED at once with a retry-after hint.
    max_queued_requests: int = pydantic.Field(default=1024, ge=1)
    max_queued_tokens: int = pydantic.Field(default=1_000_000, ge=1)
    # Dynamic batching: new requests per replica per round, how long a partial batch may wait
    # for one of the preferred sizes (0 = never waits), and those sizes.
    max_batch_size: int = pydantic.Field(default=32, ge=1)
    max_queue_delay: float = pydantic.Field(default=0.0, ge=0, le=10)
    preferred_batch_sizes: list[int] = pydantic.Field(default_factory=list)
    # Prefix affinity gives way when the preferred replica carries this much more load per slot.
    affinity_load_guard: float = pydantic.Field(default=0.5, ge=0)
    # Failover: attempts per request, and how long one waits for a replica when none is left.
    max_failovers: int = pydantic.Field(default=3, ge=0)
    failover_wait: float = pydantic.Field(default=10.0, ge=0)
    # A replica with running work and no forward progress for this long receives no new requests.
    hang_timeout: float = pydantic.Field(default=30.0, gt=0)
    # Embedding requests arriving within this many seconds share one worker call, up to this many inputs.
    embed_max_delay: float = pydantic.Field(default=0.002, ge=0, le=1)
    embed_max_inputs: int = pydantic.Field(default=256, ge=1)
    # Fair-queuing weight per tenant (default 1.0).
    tenant_weights: dict[str, float] = pydantic.Field(default_factory=dict)

    def dispatch_policy(self) -> DispatchPolicy:
        """The dispatcher's knobs from these settings."""
        return DispatchPolicy(
            max_queued_requests=self.max_queued_requests,
            max_queued_tokens=self.max_queued_tokens,
            max_batch_size=self.max_batch_size,
            max_queue_delay=self.max_queue_delay,
            preferred_batch_sizes=tuple(self.preferred_batch_sizes),
            affinity_load_guard=self.affinity_load_guard,
            max_failovers=self.max_failovers,
            failover_wait=self.failover_wait,
            tenant_weights=dict(self.tenant_weights),
        )
    log_level: str = "info"
    # Prometheus /metrics on this port (0: a free one); None = off.
    metrics_port: int | None = pydantic.Field(default=None, ge=0, le=65535)
