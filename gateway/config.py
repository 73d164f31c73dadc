"""Gateway configuration."""

from __future__ import annotations

from typing import ClassVar

import pydantic

from moemesh.services.core.config import ServiceConfig


class GatewayConfig(ServiceConfig):
    """Public endpoints, upstream scheduler and request limits of the gateway."""

    ENV_PREFIX: ClassVar[str] = "MOEMESH_GATEWAY_"

    host: str = "127.0.0.1"
    port: int = pydantic.Field(default=0, ge=0, le=65535)
    # HTTP API port; 0 picks a free one, None disables the HTTP API.
    http_port: int | None = pydantic.Field(default=None, ge=0, le=65535)
    scheduler: str = pydantic.Field(min_length=3, description="scheduler host:port")
    # Redis for the caches; None runs without them.
    redis_url: str | None = None
    # Model used when a request names none; default: the first the mesh serves.
    default_model: str | None = None
    default_embedding_model: str | None = None
    # Largest request message accepted, bytes (gRPC refuses bigger ones).
    max_request_bytes: int = pydantic.Field(default=4 * 1024 * 1024, ge=1024)
    max_stop_sequences: int = pydantic.Field(default=8, ge=0, le=64)
    max_stop_sequence_bytes: int = pydantic.Field(default=128, ge=1)
    grace: float = pydantic.Field(default=10.0, ge=0)
    # Response and embedding caches in Redis (need redis_url); entry lifetimes; one scope for all tenants.
    response_cache: bool = True
    response_cache_ttl: float = pydantic.Field(default=3600.0, gt=0)
    embedding_cache_ttl: float = pydantic.Field(default=86400.0, gt=0)
    cache_shared_scope: bool = False
    # Resumable streams: how long a journaled request's events stay replayable.
    journal_ttl: float = pydantic.Field(default=3600.0, gt=0)
    # Tenants file (JSON: API key hashes, JWT settings, allowed models, priority, rate limits; see
    # gateway/tenants.py); None = open mode: no authentication, one "default" tenant, no rate limits.
    tenants_file: str | None = None
    # Enforce the tenants' requests_per_second / tokens_per_minute (in Redis when redis_url is set, shared
    # by every gateway; in-process otherwise and while Redis is unreachable).
    rate_limits: bool = True
    rate_limit_redis_timeout: float = pydantic.Field(default=0.1, gt=0, le=5)
    # Audit records (logger "moemesh.audit") carry the prompt text only when this is on.
    audit_prompts: bool = False
    # Prometheus /metrics on this port (0: a free one); None = off.
    metrics_port: int | None = pydantic.Field(default=None, ge=0, le=65535)
    log_level: str = "info"
