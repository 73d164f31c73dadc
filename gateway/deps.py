"""The gateway's dependencies object: every shared service a handler uses, built once at start-up.

`gateway/main.py` builds one `GatewayDeps` from the config and hands it to the gRPC servicers and the HTTP app;
handlers take what they need from it instead of each being passed the same half-dozen arguments.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from moemesh.cache.client import connect
from moemesh.cache.embeddings import EmbeddingCache
from moemesh.cache.response import ResponseCache
from moemesh.gateway import ratelimit
from moemesh.gateway.audit import AuditLog
from moemesh.gateway.caches import GatewayCaches
from moemesh.gateway.catalogue import ModelCatalogue
from moemesh.gateway.config import GatewayConfig
from moemesh.gateway.in_flight import InFlight
from moemesh.gateway.journal import Journal
from moemesh.gateway.ratelimit import RateLimiter
from moemesh.gateway.request_metrics import RequestMetrics
from moemesh.gateway.tenants import Authenticator, TenantRegistry
from moemesh.services.scheduler.client import SchedulerClient


@dataclass(frozen=True)
class GatewayDeps:
    """The scheduler client, model catalogue, authenticator, rate limiter, caches (with the stream journal),
    audit log and config, shared by every gRPC and HTTP handler of one gateway process."""

    config: GatewayConfig
    client: SchedulerClient
    catalogue: ModelCatalogue
    auth: Authenticator = field(default_factory=Authenticator)  # default: open mode
    limiter: RateLimiter | None = None  # None: no rate limits
    caches: GatewayCaches | None = None  # None: no response/embedding cache, no resumable streams
    redis: aioredis.Redis | None = None  # the caches' Redis, which /readyz reports on
    audit: AuditLog | None = None  # None: an AuditLog that follows config.audit_prompts
    limiter_redis: aioredis.Redis | None = None  # the limiter's own short-timeout client, closed with the rest
    request_metrics: RequestMetrics = field(default_factory=RequestMetrics)  # latency and size histograms
    in_flight: InFlight = field(default_factory=InFlight)  # each tenant's requests in progress, against its limit

    def __post_init__(self) -> None:
        if self.audit is None:  # a frozen dataclass fills a derived field this way
            object.__setattr__(self, "audit", AuditLog(self.config.audit_prompts))

    @property
    def ready(self) -> asyncio.Event:
        """Set once the scheduler client is connected (readiness)."""
        return self.client.connected

    @property
    def journal(self) -> Journal | None:
        """The resumable-stream journal, when the caches are on."""
        return self.caches.journal if self.caches is not None else None

    @classmethod
    def from_config(cls, config: GatewayConfig) -> GatewayDeps:
        """Every dependency the config asks for; nothing connects until the client is started."""
        token = config.cluster_token.get_secret_value() if config.cluster_token else None
        client = SchedulerClient(config.scheduler, config.tls_dir, token)
        redis = connect(config.redis_url, config.cache_redis_timeout) if config.redis_url else None
        registry = TenantRegistry.load(config.tenants_file) if config.tenants_file else None
        limiter, limiter_redis = _limiter(config, registry)
        return cls(config=config, client=client,
                   catalogue=ModelCatalogue(client, config.default_model, config.default_embedding_model),
                   auth=Authenticator(registry), limiter=limiter, caches=_caches(config, redis), redis=redis,
                   limiter_redis=limiter_redis)

    async def close(self) -> None:
        """Close the scheduler client and the Redis clients opened by `from_config`."""
        await self.client.close()
        for redis in (self.redis, self.limiter_redis):
            if redis is not None:
                await redis.aclose()


def _caches(config: GatewayConfig, redis: aioredis.Redis | None) -> GatewayCaches | None:
    if redis is None or not config.response_cache:
        return None
    # The journal gets its own client: its blocking stream reads need a longer timeout than cache lookups.
    journal = Journal(connect(config.redis_url, timeout=5.0), ttl=config.journal_ttl)
    return GatewayCaches(ResponseCache(redis, ttl=config.response_cache_ttl),
                         EmbeddingCache(redis, ttl=config.embedding_cache_ttl), config.cache_shared_scope, journal)


def _limiter(config: GatewayConfig, registry: TenantRegistry | None) -> tuple[RateLimiter | None, aioredis.Redis | None]:
    """The tenants' rate limiter (shared through Redis when there is one) and its Redis client."""
    if registry is None or not config.rate_limits:
        return None, None
    limiter_redis = ratelimit.connect(config.redis_url, config.rate_limit_redis_timeout) if config.redis_url else None
    return RateLimiter(limiter_redis, timeout=config.rate_limit_redis_timeout), limiter_redis
