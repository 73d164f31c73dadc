"""A local mesh in a child process, for test suites and benchmarks: `moemesh up` on free ports, and its addresses.

    mesh = start_mesh(workdir, "--no-embeddings")
    ... mesh.gateway, mesh.http, mesh.scheduler, mesh.workers ...
    stop_mesh(mesh)

The mesh is started exactly as a user starts it (the CLI), writes its ready
file once every service is healthy, and logs each service to
`workdir/logs/<service>.log`.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

START_TIMEOUT = 240.0  # seconds: a loaded 2-core machine builds the native kernels and loads models first


class ReadyAddresses:
    """The services' addresses, read from a ready document (`self.ready`, as `moemesh up` writes it)."""

    ready: dict

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

    @property
    def shards(self) -> list[str]:
        """The expert shards' addresses (`--ep-size N`; none otherwise)."""
        return [s["address"] for s in self.ready.get("shards", [])]


@dataclass
class RunningMesh(ReadyAddresses):
    """A `moemesh up` process tree and what its ready file says."""

    process: subprocess.Popen
    ready: dict
    log_dir: pathlib.Path
    cluster_token: str = ""  # the mesh's credential (given to `moemesh up` by environment), for internal calls

    @property
    def internal_metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata that authenticates a call to the scheduler or a worker with the cluster token."""
        return (("authorization", f"Bearer {self.cluster_token}"),)

    def read_ready(self) -> dict:
        """The ready file as the supervisor last wrote it (it is rewritten after each restart of a service)."""
        self.ready = json.loads(self.ready_file.read_text())
        return self.ready

    @property
    def ready_file(self) -> pathlib.Path:
        return self.log_dir.parent / "ready.json"

    def service_pids(self) -> list[int]:
        pids = [self.ready["gateway"]["pid"], self.ready["scheduler"]["pid"]]
        return pids + [w["pid"] for w in self.ready["workers"]] + [s["pid"] for s in self.ready.get("shards", [])]

    def logs(self) -> str:
        """The tail of every service's log, for an assertion message."""
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.log_dir.glob("*.log")))


def start_mesh(workdir: pathlib.Path, *args: str, timeout: float = START_TIMEOUT, quiet: bool = False) -> RunningMesh:
    """Run `moemesh up` (gateway gRPC and HTTP on free ports, plus `args`) and wait for its ready file.

    With `quiet` the supervisor's own output is dropped; otherwise it is kept for the error raised when the
    mesh does not start. The cluster token is MOEMESH_CLUSTER_TOKEN if set, else a fresh one, known to the caller
    as `RunningMesh.cluster_token` (as an operator who sets it knows it).
    """
    ready_file = workdir / "ready.json"
    log_dir = workdir / "logs"
    token = os.environ.get("MOEMESH_CLUSTER_TOKEN") or secrets.token_urlsafe(32)
    process = subprocess.Popen(
        [sys.executable, "-m", "moemesh.cli", "up", "--port", "0", "--http-port", "0",
         "--ready-file", str(ready_file), "--log-dir", str(log_dir), *args],
        stdout=subprocess.DEVNULL if quiet else subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "MOEMESH_CLUSTER_TOKEN": token},
    )
    deadline = time.monotonic() + timeout
    while not ready_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            output = process.communicate()[0] or ""
            logs = "\n".join(p.read_text()[-3000:] for p in log_dir.glob("*.log")) if log_dir.exists() else ""
            raise RuntimeError(f"the mesh did not start (exit {process.returncode}):\n{output}\n{logs}")
        time.sleep(0.1)
    return RunningMesh(process, json.loads(ready_file.read_text()), log_dir, token)


def stop_mesh(mesh: RunningMesh, sig: int = signal.SIGINT, timeout: float = 60.0) -> int:
    """Stop the mesh as Ctrl-C would (or with `sig`) and return its exit status; killed after `timeout` seconds."""
    mesh.process.send_signal(sig)
    try:
        return mesh.process.wait(timeout)
    finally:
        if mesh.process.poll() is None:
            mesh.process.kill()
