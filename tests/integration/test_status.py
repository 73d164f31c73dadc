"""`moemesh status` against a real mesh: nodes, models, queues and caches, as an operator sees them."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moemesh.local import start_mesh, stop_mesh
from moemesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """`moemesh up` with no metrics setting: metrics are on by default."""
    with pytest.MonkeyPatch.context() as env:
        for service in ("GATEWAY", "SCHEDULER", "WORKER"):
            env.delenv(f"MOEMESH_{service}_METRICS_PORT", raising=False)
        running = start_mesh(tmp_path_factory.mktemp("status"), "--no-embeddings", "--no-http")
    yield running
    stop_mesh(running)


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from a Prometheus endpoint."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_are_on_by_default_and_the_histograms_move_with_traffic(mesh):
    addresses = {name: mesh.ready[name]["metrics_address"] for name in ("gateway", "scheduler")}
    addresses["worker"] = mesh.ready["workers"][0]["metrics_address"]
    assert all(addresses.values()), f"every service exports metrics under moemesh up: {addresses}"
    before = scrape(addresses["gateway"])
    with grpc.insecure_channel(mesh.gateway) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for i in range(3):
            stub.Complete(generation_pb2.GenerateRequest(
                prompt=common_pb2.Prompt(text=f"def metrics_{i}():"), cache_mode=common_pb2.CACHE_MODE_NO_STORE,
                sampling=common_pb2.SamplingParams(max_tokens=5, temperature=0.0)), timeout=60)
    after, scheduler = scrape(addresses["gateway"]), scrape(addresses["scheduler"])
    model = (("model", "demo-moe"),)
    for name in ("moemesh_gateway_time_to_first_token_seconds_count", "moemesh_gateway_request_duration_seconds_count",
                 "moemesh_gateway_time_per_output_token_seconds_count", "moemesh_gateway_completion_tokens_count"):
        assert after[(name, model)] - before.get((name, model), 0) == 3, name
    assert after[("moemesh_gateway_completion_tokens_sum", model)] - \
        before.get(("moemesh_gateway_completion_tokens_sum", model), 0) == 15
    assert after[("moemesh_gateway_time_to_first_token_seconds_bucket", (("le", "+Inf"), *model))] >= 3
    ok = ("moemesh_gateway_requests_total", (("kind", "generate"), ("status", "OK")))
    assert after[ok] - before.get(ok, 0) == 3, "requests are counted by kind and status"
    assert after[("moemesh_gateway_rate_limited_total", ())] == 0, "open mode limits nobody"
    assert scheduler[("moemesh_scheduler_queue_wait_seconds_count", model)] >= 3
    assert scheduler[("moemesh_scheduler_batch_size_count", model)] >= 1
    assert scrape(addresses["worker"]), "the worker's endpoint answers"


def status(mesh, *args: str, token: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MOEMESH_CLUSTER_TOKEN"}
    if token is not None:
        env["MOEMESH_CLUSTER_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "moemesh.cli", "status", "--ready-file", str(mesh.ready_file), *args],
                          capture_output=True, text=True, timeout=60, env=env | {"COLUMNS": "250"})


def test_status_shows_the_nodes_models_queues_and_caches(mesh):
    with grpc.insecure_channel(mesh.gateway) as channel:  # one request: the model's queue exists from then on
        generation_pb2_grpc.GenerationStub(channel).Complete(generation_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(text="def status():"), sampling=common_pb2.SamplingParams(max_tokens=2)),
            timeout=60)
    shown = status(mesh, token=mesh.cluster_token)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    worker = mesh.ready["workers"][0]
    for expected in ("nodes", worker["node_id"], "worker", "ready", "models", "demo-moe", "queues and caches",
                     "queued requests", "failovers", "cache misses"):
        assert expected in shown.stdout, f"{expected!r} missing from:\n{shown.stdout}"


def test_status_without_the_cluster_token_says_what_it_could_not_read(mesh):
    shown = status(mesh, token=None)
    assert shown.returncode == 1
    assert "not read: scheduler" in shown.stdout and "UNAUTHENTICATED" in shown.stdout
    assert "demo-moe" in shown.stdout, "what the gateway answers is still shown"


# ---- the Grafana dashboard (deploy/grafana) against the metrics the mesh really exports -------------------------
GRAFANA = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "grafana"
SAMPLE_SUFFIXES = ("_bucket", "_count", "_sum", "_total")


@pytest.fixture(scope="module")
def renderer():
    """deploy/grafana/render.py, the script that draws the dashboard without Grafana (its PromQL evaluator too)."""
    spec = importlib.util.spec_from_file_location("moemesh_deploy_grafana_render", GRAFANA / "render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def complete(mesh, count: int, name: str) -> None:
    """`count` short greedy generations through the gateway (5 tokens each, past the response cache)."""
    with grpc.insecure_channel(mesh.gateway) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for i in range(count):
            stub.Complete(generation_pb2.GenerateRequest(
                prompt=common_pb2.Prompt(text=f"def {name}_{i}():"), cache_mode=common_pb2.CACHE_MODE_NO_STORE,
                sampling=common_pb2.SamplingParams(max_tokens=5, temperature=0.0)), timeout=60)


def exported_names(address: str) -> set[str]:
    """Every sample name an endpoint exports, and its families' names with the suffixes a query may add."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    names = {sample.name for family in families for sample in family.samples}
    return names | {family.name + suffix for family in families for suffix in ("", *SAMPLE_SUFFIXES)}


def test_every_metric_the_dashboard_queries_is_one_the_services_export(mesh, renderer):
    complete(mesh, 2, "dashboard")
    services = [mesh.ready["gateway"], mesh.ready["scheduler"], *mesh.ready["workers"]]
    exported = set().union(*(exported_names(service["metrics_address"]) for service in services))
    dashboard = json.loads((GRAFANA / "moemesh.json").read_text())
    queried = {(panel["title"], name) for panel in dashboard["panels"] for target in panel.get("targets", [])
               for name in renderer.metric_names(renderer.parse(target["expr"]))}
    assert len({panel for panel, _ in queried}) == len(dashboard["panels"]), "every panel queries a metric"
    missing = sorted(f"{name} (panel {panel!r})" for panel, name in queried if name not in exported)
    assert not missing, "the dashboard queries metrics no service exports:\n" + "\n".join(missing)
    assert {panel["datasource"]["uid"] for panel in dashboard["panels"]} == {"prometheus"}, \
        "every panel reads the provisioned datasource (deploy/observability/grafana-provisioning)"


def test_the_renderer_evaluates_every_panel_from_real_scrapes_and_draws_the_dashboard(mesh, renderer, tmp_path):
    targets = renderer.scrape_targets(mesh.ready)
    assert {job for job, _ in targets} == {"moemesh-gateway", "moemesh-scheduler", "moemesh-worker"}
    recording = renderer.Recording(interval=1.0)
    recording.add(time.time(), renderer.scrape_all(targets))
    complete(mesh, 3, "render")
    recording.add(time.time(), renderer.scrape_all(targets))
    first, last = recording.times
    window = last - first + 1.0  # one rate over both scrapes
    panels = {panel.title: panel for panel in renderer.load_panels()}
    values = {(panel.title, target.legend): renderer.evaluate(target.expr, recording, last, window)
              for panel in panels.values() for target in panel.targets}
    # Panels fed by every generation have a finite number for each of their queries.
    for title in ("Token throughput", "Request rate by outcome", "Time to first token", "Time per output token",
                  "End-to-end latency", "Queue wait", "Request size"):
        for target in panels[title].targets:
            found = values[(title, target.legend)]
            assert found and all(math.isfinite(v) for v in found.values()), f"{title} / {target.legend}: {found}"
    completion = values[("Token throughput", "completion (gw)")][()]
    assert completion * (last - first) == pytest.approx(15), "3 requests of 5 tokens between the two scrapes"
    assert 0 < values[("Time to first token", "p50")][()] <= values[("Time to first token", "p99")][()] < 60
    out = tmp_path / "dashboard.png"
    renderer.render(list(panels.values()), recording, out, window)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000, out.stat().st_size


def test_the_renderer_refuses_promql_outside_its_subset(renderer):
    for expr in ("max(moemesh_worker_running_seqs)", "sum without (le) (moemesh_worker_running_seqs)",
                 'moemesh_worker_aborts_total{model=~"demo.*"}', "rate(moemesh_worker_aborts_total[1m]) > 0",
                 "increase(moemesh_worker_aborts_total[1m])", "moemesh_worker_aborts_total[1m]",
                 "rate(moemesh_worker_aborts_total[1m] offset 5m)"):
        with pytest.raises(renderer.UnsupportedQuery, match="only sum"):
            renderer.parse(expr)
