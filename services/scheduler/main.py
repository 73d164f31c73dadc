"""Scheduler process entry point."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

from moemesh.services.core.auth import SCHEDULER_ACCESS, ClusterAuthInterceptor
from moemesh.services.core.entrypoint import service_main
from moemesh.services.core.metrics import counter, gauge, labelled_counter, serve_metrics
from moemesh.services.core.server import GrpcServer, announce_ready, stop_event_on_signals
from moemesh.services.core.tls import server_credentials
from moemesh.services.scheduler.config import SchedulerConfig
from moemesh.services.scheduler.dispatcher import Dispatcher
from moemesh.services.scheduler.embed_batcher import EmbedBatcher
from moemesh.services.scheduler.registry import NodeState, Registry
from moemesh.services.scheduler.service import SchedulerServicer
from moemesh.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger("moemesh.scheduler")

SCHEDULER_SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


async def expire_forever(registry: Registry) -> None:
    """Evict nodes that missed their heartbeats (checked twice per interval)."""
    while True:
        await asyncio.sleep(registry.heartbeat_interval / 2)
        for node_id in registry.expire():
            log.warning("node evicted: missed heartbeats", extra={"node_id": node_id})


def scheduler_metrics(registry: Registry, dispatcher: Dispatcher, embed_batcher: EmbedBatcher) -> list:
    """The scheduler's metric families, read from the live registry and dispatcher."""
    c = dispatcher.counters
    families = [
        counter("moemesh_scheduler_requests_admitted", "Requests accepted into an admission queue.", c.admitted),
        counter("moemesh_scheduler_requests_rejected", "Requests refused because a queue was full.", c.rejected),
        counter("moemesh_scheduler_requests_completed", "Requests a worker finished (any finish reason).", c.completed),
        counter("moemesh_scheduler_failovers", "Requests moved to another replica after theirs was lost.", c.failovers),
        counter("moemesh_scheduler_failover_exhausted", "Requests failed because no replica could continue them.",
                c.failed_over_lost),
        counter("moemesh_scheduler_client_disconnects", "Client cancellations sent to a worker.", c.client_cancels),
        counter("moemesh_scheduler_engine_aborts", "Requests a worker reported aborted.", c.engine_aborts),
        counter("moemesh_scheduler_queue_cancels", "Requests cancelled while still queued.", c.queue_cancels),
        counter("moemesh_scheduler_queue_deadline_expired", "Requests whose deadline passed while queued.",
                c.deadline_in_queue),
        gauge("moemesh_scheduler_queue_depth", "Requests waiting per model.",
              {(model,): len(q) for model, q in dispatcher.queues.items()}, ["model"]),
        gauge("moemesh_scheduler_queue_tokens", "Estimated tokens waiting per model.",
              {(model,): q.tokens for model, q in dispatcher.queues.items()}, ["model"]),
        gauge("moemesh_scheduler_in_flight", "Requests running on a replica.",
              {(n.node_id,): n.in_flight for n in registry.nodes.values()}, ["node"]),
    ]
    states: dict[tuple[str, ...], float] = {(state.value,): 0 for state in NodeState}
    for node in registry.nodes.values():
        states[(node.state.value,)] += 1
    families.append(gauge("moemesh_scheduler_nodes", "Registered nodes by state.", states, ["state"]))
    families.append(expert_tokens_metric(registry))
    families += [dispatcher.queue_wait.family(), dispatcher.batch_size.family()]
    families.append(counter("moemesh_scheduler_embed_requests", "Embed requests received.", embed_batcher.requests))
    families.append(counter("moemesh_scheduler_embed_worker_calls", "Worker Embed calls (batched requests share one).",
                            embed_batcher.calls))
    return families


def expert_tokens_metric(registry: Registry):
    """moemesh_expert_tokens_total{model, replica_group, expert}: the data a placement rebalancer reads."""
    samples = {(model, group, str(expert)): tokens
               for (model, group), totals in registry.expert_tokens.items()
               for expert, tokens in enumerate(totals)}
    return labelled_counter(
        "moemesh_expert_tokens",
        "Tokens routed to each expert by a replica since it registered, summed over its MoE layers (a token "
        "counts once per layer for each of its top-k experts), as its heartbeats report them.",
        samples, ["model", "replica_group", "expert"])


async def serve(config: SchedulerConfig, ready_fd: int | None) -> None:
    stop = stop_event_on_signals()
    registry = Registry(config.heartbeat_interval, config.max_missed_heartbeats, hang_timeout=config.hang_timeout)
    token = config.cluster_token.get_secret_value() if config.cluster_token else None
    dispatcher = Dispatcher(registry, config.dispatch_policy(), tls_dir=config.tls_dir, cluster_token=token)
    credentials = server_credentials(config.tls_dir, "scheduler") if config.tls_dir else None
    auth = ClusterAuthInterceptor(token, {SCHEDULER_SERVICE: SCHEDULER_ACCESS}, mutual_tls=config.tls_dir is not None)
    server = GrpcServer(config.host, config.port, grace=config.grace, credentials=credentials, interceptors=[auth])
    servicer = SchedulerServicer(registry, dispatcher, config.embed_max_inputs, config.embed_max_delay)
    server.add(scheduler_pb2_grpc.add_SchedulerServicer_to_server, servicer, SCHEDULER_SERVICE)
    await server.start()
    expiry = asyncio.create_task(expire_forever(registry))
    metrics_address, stop_metrics = None, None
    if config.metrics_port is not None:
        metrics_address, stop_metrics = serve_metrics(config.host, config.metrics_port,
                                                      lambda: scheduler_metrics(registry, dispatcher, servicer.embed_batcher))
    await server.set_serving(True)
    announce_ready(ready_fd, service="scheduler", address=server.address, metrics_address=metrics_address)
    await stop.wait()
    if stop_metrics is not None:
        stop_metrics()
    expiry.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await expiry
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    return service_main(argv, service="scheduler", description=__doc__, config_cls=SchedulerConfig,
                        serve=serve)


if __name__ == "__main__":
    sys.exit(main())
