"""Gateway process entry point: public gRPC (and HTTP) in front of the scheduler."""

from __future__ import annotations

import logging
import sys

from moemesh.gateway.caches import GatewayCaches
from moemesh.gateway.config import GatewayConfig
from moemesh.gateway.deps import GatewayDeps
from moemesh.gateway.http import HttpServer, create_app
from moemesh.gateway.service import add_servicers
from moemesh.services.core.entrypoint import service_main
from moemesh.services.core.metrics import counter, gauge, labelled_counter, median, serve_metrics
from moemesh.services.core.server import GrpcServer, announce_ready, stop_event_on_signals

log = logging.getLogger("moemesh.gateway")


async def serve(config: GatewayConfig, ready_fd: int | None) -> None:
    """Build the dependencies, serve gRPC (and HTTP) until SIGTERM, then drain and close."""
    stop = stop_event_on_signals()
    deps = GatewayDeps.from_config(config)
    registry = deps.auth.registry
    log.info("tenants: %s", f"{len(registry.by_id)} from {config.tenants_file}" if registry else "open mode")
    # The transport's cap is above max_request_bytes, so that a request between the two gets INVALID_ARGUMENT
    # naming the limit (validate_size) instead of gRPC's bare RESOURCE_EXHAUSTED.
    server = GrpcServer(config.host, config.port, grace=config.grace,
                        max_message_bytes=2 * config.max_request_bytes + (1 << 20))
    add_servicers(server, deps)
    http = HttpServer(create_app(deps), config.host, config.http_port) if config.http_port is not None else None
    deps.client.start()
    await server.start()
    if http is not None:
        http.start()
    await deps.ready.wait()
    await server.set_serving(True)
    metrics_address, stop_metrics = None, None
    if config.metrics_port is not None:
        metrics_address, stop_metrics = serve_metrics(config.host, config.metrics_port,
                                                      lambda: gateway_metrics(deps))
    announce_ready(ready_fd, service="gateway", address=server.address,
                   http_address=http.address if http else None, metrics_address=metrics_address)
    await stop.wait()
    if stop_metrics is not None:
        stop_metrics()
    await server.set_serving(False)
    if http is not None:
        await http.stop()
    await server.stop()
    await deps.close()


def gateway_metrics(deps: GatewayDeps) -> list:
    """Everything the gateway exports: requests by outcome, rate-limit refusals, latency and size histograms,
    caches."""
    limited = deps.limiter.stats.limited if deps.limiter is not None else 0  # no limits (open mode): none refused
    return [
        labelled_counter("moemesh_gateway_requests", "Requests the gateway ended, by kind (generate, embed, auth: a "
                         "refused credential) and status.", deps.audit.outcomes, ("kind", "status")),
        counter("moemesh_gateway_rate_limited", "Requests refused by a tenant's rate limit.", limited),
        *deps.request_metrics.families(),
        *cache_metrics(deps.caches),
    ]


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


def main(argv: list[str] | None = None) -> int:
    """Run the gateway process."""
    return service_main(argv, service="gateway", description=__doc__, config_cls=GatewayConfig,
                        serve=serve)


if __name__ == "__main__":
    sys.exit(main())
