"""Shared fixtures: a local mesh started exactly as the CLI starts it; `gpu` tests only where CUDA is."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "worker" / "demo" / "demo-moe"
MESH_START_TIMEOUT = 240.0


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` report as skipped, not applicable, on a machine without a CUDA device."""
    if torch.cuda.is_available():
        return
    not_applicable = pytest.mark.skip(reason="not applicable: no CUDA device on this machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(not_applicable)


@dataclass
class RunningMesh:
    """A `moemesh up` process tree and what its ready file says."""

    process: subprocess.Popen
    ready: dict
    log_dir: pathlib.Path

    @property
    def gateway(self) -> str:
        return self.ready["gateway"]["address"]

    @property
    def http(self) -> str:
        return self.ready["gateway"]["http_address"]

    @property
    def scheduler(self) -> str:
        return self.ready["scheduler"]["address"]

    @property
    def workers(self) -> list[str]:
        return [w["address"] for w in self.ready["workers"]]

    def service_pids(self) -> list[int]:
        pids = [self.ready["gateway"]["pid"], self.ready["scheduler"]["pid"]]
        return pids + [w["pid"] for w in self.ready["workers"]]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.log_dir.glob("*.log")))


def start_mesh(tmp: pathlib.Path, *args: str) -> RunningMesh:
    """Run `moemesh up` on free ports and wait for its ready file."""
    ready_file = tmp / "ready.json"
    log_dir = tmp / "logs"
    process = subprocess.Popen(
        [sys.executable, "-m", "moemesh.cli", "up", "--port", "0", "--http-port", "0",
         "--ready-file", str(ready_file), "--log-dir", str(log_dir), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + MESH_START_TIMEOUT
    while not ready_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            output = process.communicate()[0]
            logs = "\n".join(p.read_text()[-3000:] for p in log_dir.glob("*.log")) if log_dir.exists() else ""
            raise AssertionError(f"mesh did not start (exit {process.returncode}):\n{output}\n{logs}")
        time.sleep(0.1)
    return RunningMesh(process, json.loads(ready_file.read_text()), log_dir)


def stop_mesh(mesh: RunningMesh, sig: int = signal.SIGINT, timeout: float = 60.0) -> int:
    mesh.process.send_signal(sig)
    try:
        return mesh.process.wait(timeout)
    finally:
        if mesh.process.poll() is None:
            mesh.process.kill()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited all the same.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> RunningMesh:
    """One mesh (demo model, one worker, embeddings) shared by a test module."""
    running = start_mesh(tmp_path_factory.mktemp("mesh"))
    yield running
    if running.process.poll() is None:
        stop_mesh(running)
