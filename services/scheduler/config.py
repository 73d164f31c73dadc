"""Scheduler configuration."""

from __future__ import annotations

from typing import ClassVar

import pydantic

from moemesh.services.core.config import ServiceConfig


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
    log_level: str = "info"
