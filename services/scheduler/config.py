"""Scheduler configuration."""

from __future__ import annotations

import pydantic
from pydantic_settings import SettingsConfigDict

from moemesh.services.core.config import MetricsPort, ServiceConfig
from moemesh.services.scheduler.dispatcher import DispatchPolicy


class SchedulerConfig(ServiceConfig):
    """Registry timing, network and auth settings of the scheduler."""

    model_config = SettingsConfigDict(env_prefix="MOEMESH_SCHEDULER_")

    host: str = pydantic.Field(default="127.0.0.1", description="address the scheduler's gRPC server binds")
    port: int = pydantic.Field(default=0, ge=0, le=65535, description="gRPC port (0: a free one)")
    heartbeat_interval: float = pydantic.Field(
        default=1.0, gt=0, le=60, description="seconds between worker heartbeats (told to workers when they register)")
    max_missed_heartbeats: int = pydantic.Field(
        default=3, ge=1, le=100, description="heartbeat intervals a node may miss before it is evicted")
    cluster_token: pydantic.SecretStr | None = pydantic.Field(
        default=None, min_length=8,
        description="the mesh's shared secret: every caller of every method (workers, gateways, operators) must "
                    "present it as metadata authorization: Bearer <token>; give it by environment "
                    "(MOEMESH_SCHEDULER_CLUSTER_TOKEN) or a secret file, not this flag (argv shows in ps); "
                    "unset (and no tls_dir): the internal plane is open")
    grace: float = pydantic.Field(default=10.0, ge=0, description="seconds in-flight calls get on shutdown")
    max_queued_requests: int = pydantic.Field(
        default=1024, ge=1, description="admission queue bound per model, requests (beyond: RESOURCE_EXHAUSTED)")
    max_queued_tokens: int = pydantic.Field(
        default=1_000_000, ge=1, description="admission queue bound per model, estimated tokens")
    max_batch_size: int = pydantic.Field(default=32, ge=1, description="new requests per replica per dispatch round")
    max_queue_delay: float = pydantic.Field(
        default=0.0, ge=0, le=10,
        description="seconds a partial batch may wait for one of the preferred sizes (0: never waits)")
    preferred_batch_sizes: list[int] = pydantic.Field(
        default_factory=list, description="batch sizes worth waiting for (JSON list)")
    affinity_load_guard: float = pydantic.Field(
        default=0.5, ge=0,
        description="prefix affinity gives way when the preferred replica carries this much more load per slot")
    max_failovers: int = pydantic.Field(default=3, ge=0, description="failover attempts per request")
    failover_wait: float = pydantic.Field(
        default=10.0, ge=0, description="seconds a failing-over request waits for a replica when none is left")
    hang_timeout: float = pydantic.Field(
        default=30.0, gt=0,
        description="a replica with running work and no forward progress for this long receives no new requests")
    embed_max_delay: float = pydantic.Field(
        default=0.002, ge=0, le=1, description="embedding requests arriving within this many seconds share one call")
    embed_max_inputs: int = pydantic.Field(default=256, ge=1, description="most inputs of one batched embedding call")
    tenant_weights: dict[str, float] = pydantic.Field(
        default_factory=dict, description="fair-queuing weight per tenant (JSON object; default 1.0)")
    log_level: str = pydantic.Field(default="info", description="log level")
    metrics_port: MetricsPort = None

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
