"""Processes of the integration tests: the demo model, a liveness probe, and one service started on its own."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import grpc

from moemesh.cli import demo_model_dir
from moemesh.local import RunningMesh
from moemesh.v1 import scheduler_pb2, scheduler_pb2_grpc

DEMO_MODEL = demo_model_dir()


def live(state: str) -> bool:
    """A node registered and serving: "ready", or "suspect" for as long as a heartbeat is late (a loaded host)."""
    return state in ("ready", "suspect")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie has exited, though it still answers a signal probe)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Service:
    """One service process started as the supervisor starts it (ready JSON on a pipe)."""

    def __init__(self, module: str, *args: str, log: pathlib.Path, env: dict[str, str] | None = None) -> None:
        """`env` is added to this process's environment for the service (e.g. its cluster token)."""
        read_fd, write_fd = os.pipe()
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, *args, "--ready-fd", str(write_fd)],
                pass_fds=(write_fd,), stdout=out, stderr=out, start_new_session=True, env={**os.environ, **(env or {})},
            )
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            line = pipe.readline()
        assert line, f"{module} exited before it was ready:\n{log.read_text()[-3000:]}"
        self.info = json.loads(line)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def routed_requests(mesh: RunningMesh) -> int:
    """Requests the mesh's scheduler has routed to workers so far (a cache hit routes none)."""
    with grpc.insecure_channel(mesh.scheduler) as channel:
        nodes = scheduler_pb2_grpc.SchedulerStub(channel).ListNodes(scheduler_pb2.ListNodesRequest(), timeout=10,
                                                                    metadata=mesh.internal_metadata).nodes
    return sum(n.routed_requests for n in nodes)
