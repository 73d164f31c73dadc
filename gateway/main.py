"""Gateway process entry point: public gRPC (and HTTP) in front of the scheduler."""

from __future__ import annotations

import argparse
import logging
import sys

from moemesh.cache.client import connect
from moemesh.cache.response import EmbeddingCache, ResponseCache
from moemesh.gateway import ratelimit
from moemesh.gateway.caches import GatewayCaches
from moemesh.gateway.catalogue import ModelCatalogue
from moemesh.gateway.config import GatewayConfig
from moemesh.gateway.http import HttpServer, create_app
from moemesh.gateway.journal import Journal
from moemesh.gateway.service import EmbeddingsServicer, GenerationServicer, ModelsServicer
from moemesh.gateway.tenants import Authenticator, TenantRegistry
from moemesh.services.core.entrypoint import service_main
from moemesh.services.core.metrics import counter, gauge, median, serve_metrics
from moemesh.services.core.server import GrpcServer, announce_ready, stop_event_on_signals
from moemesh.services.scheduler.client import SchedulerClient
from moemesh.v1 import (
    embeddings_pb2,
    embeddings_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)

log = logging.getLogger("moemesh.gateway")


def _service_name(module, name: str) -> str:
    return module.DESCRIPTOR.services_by_name[name].full_name


async def serve(config: GatewayConfig, ready_fd: int | None) -> None:
    stop = stop_event_on_signals()
    client = SchedulerClient(config.scheduler, config.tls_dir)
    catalogue = ModelCatalogue(client, config.default_model, config.default_embedding_model)
    redis = connect(config.redis_url) if config.redis_url else None
    caches = None
    if redis is not None and config.response_cache:
        caches = GatewayCaches(ResponseCache(redis, ttl=config.response_cache_ttl),
                               EmbeddingCache(redis, ttl=config.embedding_cache_ttl), config.cache_shared_scope,
                               Journal(connect(config.redis_url, timeout=5.0), ttl=config.journal_ttl))
    registry = TenantRegistry.load(config.tenants_file) if config.tenants_file else None
    auth = Authenticator(registry)
    limiter, limiter_redis = None, None
    if registry is not None and config.rate_limits:
        if config.redis_url:
            limiter_redis = ratelimit.connect(config.redis_url, config.rate_limit_redis_timeout)
        limiter = ratelimit.RateLimiter(limiter_redis, timeout=config.rate_limit_redis_timeout)
    log.info("tenants: %s", f"{len(registry.by_id)} from {config.tenants_file}" if registry else "open mode")
    # The transport's cap is above max_request_bytes, so that a request between the two gets INVALID_ARGUMENT
    # naming the limit (validate_size) instead of gRPC's bare RESOURCE_EXHAUSTED.
    server = GrpcServer(config.host, config.port, grace=config.grace,
                        max_message_bytes=2 * config.max_request_bytes + (1 << 20))
    server.add(generation_pb2_grpc.add_GenerationServicer_to_server,
               GenerationServicer(config, client, catalogue, caches, auth, limiter), _service_name(generation_pb2, "Generation"))
    server.add(embeddings_pb2_grpc.add_EmbeddingsServicer_to_server,
               EmbeddingsServicer(client, catalogue, caches, auth, limiter, config), _service_name(embeddings_pb2, "Embeddings"))
    server.add(models_pb2_grpc.add_ModelsServicer_to_server,
               ModelsServicer(catalogue, auth), _service_name(models_pb2, "Models"))
    http = HttpServer(create_app(catalogue, client.connected, redis, config=config, client=client, caches=caches,
                                 auth=auth, limiter=limiter),
                      config.host, config.http_port) if config.http_port is not None else None
    client.start()
    await server.start()
    if http is not None:
        http.start()
    await client.connected.wait()
    await server.set_serving(True)
    metrics_address, stop_metrics = None, None
    if config.metrics_port is not None:
        metrics_address, stop_metrics = serve_metrics(config.host, config.metrics_port, lambda: cache_metrics(caches))
    announce_ready(ready_fd, service="gateway", address=server.address,
                   http_address=http.address if http else None, metrics_address=metrics_address)
    await stop.wait()
    if stop_metrics is not None:
        stop_metrics()
    await server.set_serving(False)
    if http is not None:
        await http.stop()
    await server.stop()
    await client.close()
    if redis is not None:
        await redis.aclose()
    if limiter_redis is not None:
        await limiter_redis.aclose()


def cache_metrics(caches: GatewayCaches | None) -> list:
    """Hits, misses, bypasses, errors, bytes and lookup latency of each cache tier."""
    if caches is None:
        return []
    families = []
    for tier, stats in (("response", caches.responses.stats), ("embedding", caches.embeddings.stats)):
        labels = {"tier": tier}
        families += [
            counter("moemesh_cache_hits", "Cache hits.", stats.hits, labels),
            counter("moemesh_cache_misses", "Cache misses.", stats.misses, labels),
            counter("moemesh_cache_bypasses", "Requests that skipped the cache.", stats.bypasses, labels),
            counter("moemesh_cache_errors", "Failed cache calls.", stats.errors, labels),
            counter("moemesh_cache_read_bytes", "Bytes read from the cache.", stats.bytes_read, labels),
            counter("moemesh_cache_written_bytes", "Bytes written to the cache.", stats.bytes_written, labels),
            gauge("moemesh_cache_lookup_seconds_p50", "Median of recent lookups.",
                  {(tier,): median(stats.lookup_seconds)}, ["tier"]),
        ]
    families.append(counter("moemesh_cache_single_flight_joined", "Requests that followed an identical one.",
                            caches.responses.stats.joined, {"tier": "response"}))
    return families


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--scheduler")
    parser.add_argument("--redis-url")
    parser.add_argument("--tls-dir")
    parser.add_argument("--default-model")


def main(argv: list[str] | None = None) -> int:
    return service_main(argv, service="gateway", description=__doc__, config_cls=GatewayConfig,
                        add_arguments=add_arguments, serve=serve)


if __name__ == "__main__":
    sys.exit(main())
