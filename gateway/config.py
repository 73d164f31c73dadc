"""Gateway configuration."""

from __future__ import annotations

import pydantic
from pydantic_settings import SettingsConfigDict

from moemesh.cache.client import DEFAULT_TIMEOUT
from moemesh.services.core.config import MetricsPort, ServiceConfig


class GatewayConfig(ServiceConfig):
    """Public endpoints, upstream scheduler and request limits of the gateway."""

    model_config = SettingsConfigDict(env_prefix="MOEMESH_GATEWAY_")

    host: str = pydantic.Field(default="127.0.0.1", description="address the gateway's gRPC and HTTP servers bind")
    port: int = pydantic.Field(default=0, ge=0, le=65535, description="public gRPC port (0: a free one)")
    http_port: int | None = pydantic.Field(
        default=None, ge=0, le=65535, description="HTTP API port (0: a free one); unset: no HTTP API")
    scheduler: str = pydantic.Field(min_length=3, description="scheduler host:port")
    redis_url: str | None = pydantic.Field(
        default=None, description="Redis for the caches; unset: no caches. A URL with a password belongs in the "
                                  "environment (MOEMESH_GATEWAY_REDIS_URL) or a secret file, not this flag")
    cluster_token: pydantic.SecretStr | None = pydantic.Field(
        default=None, min_length=8,
        description="the mesh's shared secret, presented to the scheduler (metadata authorization: Bearer <token>); "
                    "give it by environment (MOEMESH_GATEWAY_CLUSTER_TOKEN) or a secret file, not this flag")
    default_model: str | None = pydantic.Field(
        default=None, description="model used when a request names none; default: the first the mesh serves")
    default_embedding_model: str | None = pydantic.Field(
        default=None, description="embedding model used when a request names none; default: the first served")
    max_request_bytes: int = pydantic.Field(
        default=4 * 1024 * 1024, ge=1024, description="largest request accepted, bytes (gRPC message or HTTP body)")
    http_docs: bool = pydantic.Field(
        default=False, description="serve /docs, /redoc and /openapi.json (off: they map the API for anyone)")
    max_stop_sequences: int = pydantic.Field(default=8, ge=0, le=64, description="most stop strings per request")
    max_stop_sequence_bytes: int = pydantic.Field(default=128, ge=1, description="longest stop string, bytes")
    grace: float = pydantic.Field(default=10.0, ge=0, description="seconds in-flight calls get on shutdown")
    response_cache: bool = pydantic.Field(
        default=True, description="cache deterministic answers (greedy or seeded) in Redis (needs redis_url)")
    response_cache_ttl: float = pydantic.Field(default=3600.0, gt=0, description="lifetime of a cached answer, seconds")
    cache_redis_timeout: float = pydantic.Field(
        default=DEFAULT_TIMEOUT, gt=0, le=5,
        description="socket timeout of the caches' Redis calls, seconds (a call past it is a miss, never an error)")
    embedding_cache_ttl: float = pydantic.Field(
        default=86400.0, gt=0, description="lifetime of a cached embedding, seconds")
    cache_shared_scope: bool = pydantic.Field(
        default=False, description="one cache scope for all tenants (off: each tenant sees only its own entries)")
    journal_ttl: float = pydantic.Field(
        default=3600.0, gt=0, description="how long a resumable stream's events stay replayable, seconds")
    tenants_file: str | None = pydantic.Field(
        default=None, description="tenants file (JSON: API key hashes, JWT settings, allowed models, priority, "
                                  "rate limits; see gateway/tenants.py); unset: open mode, one default tenant")
    rate_limits: bool = pydantic.Field(
        default=True, description="enforce the tenants' requests_per_second and tokens_per_minute (in Redis when "
                                  "redis_url is set, shared by every gateway; in-process otherwise)")
    rate_limit_redis_timeout: float = pydantic.Field(
        default=0.1, gt=0, le=5, description="timeout of one rate-limit call to Redis, seconds")
    audit_prompts: bool = pydantic.Field(
        default=False, description='audit records (logger "moemesh.audit") carry the prompt text')
    log_level: str = pydantic.Field(default="info", description="log level")
    metrics_port: MetricsPort = None
