"""`moemesh status`: the mesh at a glance, read from the scheduler and the gateway.

A table of the scheduler's nodes (id, role, model, replica and rank, device,
state, load, last heartbeat), one of the models the gateway serves, and, where
the services export metrics (`metrics_port`), the scheduler's queues and the
gateway's cache figures. The scheduler is asked as an operator: the cluster
token comes from MOEMESH_CLUSTER_TOKEN (or the operator certificate with
`--tls-dir`); the gateway as a caller, with its API key.
"""

from __future__ import annotations

import json
import pathlib
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

import grpc
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.table import Table

from moemesh.services.core.auth import bearer_metadata
from moemesh.services.core.tls import channel_credentials
from moemesh.v1 import models_pb2, models_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

# Metric families shown, by exporter: (metric name, label to break it down by, heading).
SCHEDULER_FIGURES = (("moemesh_scheduler_queue_depth", "model", "queued requests"),
                     ("moemesh_scheduler_queue_tokens", "model", "queued tokens"),
                     ("moemesh_scheduler_in_flight", "node", "in flight"),
                     ("moemesh_scheduler_failovers", "", "failovers"))
GATEWAY_FIGURES = (("moemesh_cache_hits", "tier", "cache hits"), ("moemesh_cache_misses", "tier", "cache misses"),
                   ("moemesh_cache_bypasses", "tier", "cache bypasses"))


@dataclass
class Targets:
    """Where to read the mesh from."""

    scheduler: str | None = None
    gateway: str | None = None
    scheduler_metrics: str | None = None  # host:port of a Prometheus endpoint
    gateway_metrics: str | None = None

    @classmethod
    def from_ready_file(cls, path: pathlib.Path) -> Targets:
        """The addresses `moemesh up --ready-file` wrote."""
        ready = json.loads(path.read_text())
        return cls(scheduler=ready.get("scheduler", {}).get("address"), gateway=ready.get("gateway", {}).get("address"),
                   scheduler_metrics=ready.get("scheduler", {}).get("metrics_address"),
                   gateway_metrics=ready.get("gateway", {}).get("metrics_address"))


@dataclass
class Snapshot:
    """What one look at the mesh found; `errors` says what could not be read, and why."""

    nodes: list[scheduler_pb2.NodeInfo] = field(default_factory=list)
    models: list[models_pb2.ModelInfo] = field(default_factory=list)
    figures: dict[str, dict[str, float]] = field(default_factory=dict)  # heading -> label value -> sum
    errors: list[str] = field(default_factory=list)


def read(targets: Targets, *, cluster_token: str | None = None, api_key: str | None = None,
         tls_dir: pathlib.Path | None = None, timeout: float = 5.0) -> Snapshot:
    """One snapshot of the mesh; a source that does not answer is named in `errors`, the rest still shown."""
    snapshot = Snapshot()
    if targets.scheduler:
        channel = (grpc.secure_channel(targets.scheduler, channel_credentials(tls_dir, "operator")) if tls_dir
                   else grpc.insecure_channel(targets.scheduler))
        with channel:
            try:
                snapshot.nodes = list(scheduler_pb2_grpc.SchedulerStub(channel).ListNodes(
                    scheduler_pb2.ListNodesRequest(), metadata=bearer_metadata(cluster_token), timeout=timeout).nodes)
            except grpc.RpcError as exc:
                snapshot.errors.append(f"scheduler {targets.scheduler}: {exc.code().name}: {exc.details()}")
    if targets.gateway:
        with grpc.insecure_channel(targets.gateway) as channel:
            try:
                snapshot.models = list(models_pb2_grpc.ModelsStub(channel).ListModels(
                    models_pb2.ListModelsRequest(), metadata=bearer_metadata(api_key), timeout=timeout).models)
            except grpc.RpcError as exc:
                snapshot.errors.append(f"gateway {targets.gateway}: {exc.code().name}: {exc.details()}")
    for address, figures in ((targets.scheduler_metrics, SCHEDULER_FIGURES), (targets.gateway_metrics, GATEWAY_FIGURES)):
        if address:
            try:
                snapshot.figures.update(scrape(address, figures, timeout))
            except OSError as exc:
                snapshot.errors.append(f"metrics {address}: {exc}")
    return snapshot


def scrape(address: str, figures: tuple[tuple[str, str, str], ...], timeout: float) -> dict[str, dict[str, float]]:
    """heading -> {label value: summed sample} for the wanted families of a Prometheus endpoint."""
    url = address if address.startswith("http") else f"http://{address}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    wanted = {name: (label, heading) for name, label, heading in figures}
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            if name not in wanted:
                continue
            label, heading = wanted[name]
            key = sample.labels.get(label, "all") if label else "all"
            found.setdefault(heading, defaultdict(float))[key] += sample.value
    return {heading: dict(values) for heading, values in found.items()}


def render(snapshot: Snapshot) -> Group:
    """The snapshot as rich tables."""
    nodes = Table(title="nodes", title_justify="left")
    for column in ("node", "role", "models", "replica / rank", "device", "state", "running", "waiting",
                   "free KV blocks", "in flight", "routed", "heartbeat"):
        nodes.add_column(column, justify="right" if column in {"running", "waiting", "free KV blocks", "in flight",
                                                                 "routed", "heartbeat"} else "left")
    for node in sorted(snapshot.nodes, key=lambda n: (n.replica_group, n.rank, n.node_id)):
        role = "worker" if node.world_size <= 1 else ("rank 0" if node.rank == 0 else "expert shard")
        state = node.state if node.routable or node.rank > 0 or node.world_size <= 1 else f"{node.state} (not routable)"
        nodes.add_row(node.node_id, role, ", ".join(node.model_ids) or "-",
                      f"{node.replica_group} / {node.rank} of {max(node.world_size, 1)}", node.device or "-", state,
                      str(node.load.running_seqs), str(node.load.waiting_seqs), str(node.load.free_kv_blocks),
                      str(node.in_flight), str(node.routed_requests), f"{node.heartbeat_age:.1f} s ago")
    parts: list = [nodes]
    if snapshot.models:
        models = Table(title="models", title_justify="left")
        for column in ("model", "kind", "ready replicas", "context", "max output"):
            models.add_column(column)
        for model in snapshot.models:
            models.add_row(model.id, models_pb2.ModelKind.Name(model.kind).removeprefix("MODEL_KIND_").lower(),
                           str(model.ready_replicas), str(model.max_context_tokens), str(model.max_output_tokens))
        parts.append(models)
    if snapshot.figures:
        figures = Table(title="queues and caches", title_justify="left")
        for column in ("figure", "by", "value"):
            figures.add_column(column)
        for heading, values in snapshot.figures.items():
            for key, value in sorted(values.items()):
                figures.add_row(heading, key, f"{value:g}")
        parts.append(figures)
    for error in snapshot.errors:
        parts.append(f"[red]not read: {error}[/red]")
    return Group(*parts)
