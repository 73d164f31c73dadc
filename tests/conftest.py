"""What every test suite shares: markers by kind, `gpu` tests only where CUDA is, and a module-scoped mesh.

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


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> RunningMesh:
    """One mesh (demo model, one worker, embeddings) shared by a test module."""
    running = start_mesh(tmp_path_factory.mktemp("mesh"))
    yield running
    if running.process.poll() is None:
        stop_mesh(running)
