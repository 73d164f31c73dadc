"""What every test suite shares: markers by kind, `gpu` tests only where CUDA is, a module-scoped mesh and a
session-scoped traced one.

Tests live in folders by kind and carry its marker: `unit` (no checkpoint, no
processes), `model` (tiny checkpoints in-process), `integration` (real Redis,
gRPC servers, Envoy, whole meshes); select with `-m`. `gpu` tests need a CUDA
device and report as skipped (not applicable) where there is none; `slow`
marks the few that take longest (`-m "not slow"` for a quick run).
"""

from __future__ import annotations

import os

import pytest
import torch

from moemesh.local import RunningMesh, start_mesh, stop_mesh

KINDS = ("unit", "model", "integration")

if not torch.cuda.is_available():
    # Triton kernels run here only in Triton's interpreter, which must be chosen before Triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items) -> None:
    """Mark each test with its folder's kind; `gpu` tests are skipped, not applicable, without a CUDA device."""
    not_applicable = None if torch.cuda.is_available() else pytest.mark.skip(
        reason="not applicable: no CUDA device on this machine")
    for item in items:
        kind = item.path.parent.name
        if kind in KINDS:
            item.add_marker(kind)
        if not_applicable is not None and item.get_closest_marker("gpu") is not None:
            item.add_marker(not_applicable)


@pytest.fixture(scope="session")
def otlp_receiver():
    """A real OTLP trace receiver on loopback: what the traced mesh's services export."""
    from tests.support.otlp import OtlpReceiver
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def traced_mesh(tmp_path_factory, otlp_receiver) -> RunningMesh:
    """The demo mesh as `moemesh up` starts it (one worker, embeddings, HTTP, metrics on), with traces exported to
    `otlp_receiver` by the standard variables and the scheduler's and worker's per-request log lines (debug level)
    on. Shared by the modules that only send it requests (the OpenAI API, fuzzing, tracing), so that it starts
    once per run; a module that stops, kills or reconfigures its mesh starts its own."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint)
        env.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # milliseconds: spans arrive soon after a request
        for name in ("OTEL_TRACES_EXPORTER", "OTEL_SERVICE_NAME", "OTEL_SDK_DISABLED"):
            env.delenv(name, raising=False)
        env.setenv("MOEMESH_SCHEDULER_LOG_LEVEL", "debug")
        env.setenv("MOEMESH_WORKER_LOG_LEVEL", "debug")
        running = start_mesh(tmp_path_factory.mktemp("traced-mesh"))
    yield running
    if running.process.poll() is None:
        stop_mesh(running)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> RunningMesh:
    """One mesh (demo model, one worker, embeddings) shared by a test module."""
    running = start_mesh(tmp_path_factory.mktemp("mesh"))
    yield running
    if running.process.poll() is None:
        stop_mesh(running)
