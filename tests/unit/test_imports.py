"""What a service imports at start: each heavy library costs seconds of every start and restart."""

from __future__ import annotations

import subprocess
import sys

import pytest


def imported_by(module: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after importing `module`."""
    code = f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize(("module", "absent"), [
    ("moemesh.services.scheduler.main", {"torch", "transformers"}),  # it routes; it computes nothing
    ("moemesh.gateway.main", {"torch", "transformers"}),
    ("moemesh.worker.server.main", {"transformers"}),  # imported only to load a sentence-embedding model
    ("moemesh.worker.server.shard", {"transformers"}),
])
def test_a_service_does_not_import_what_it_does_not_use(module, absent):
    assert not imported_by(module) & absent
