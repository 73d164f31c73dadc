"""One service of the mesh inside a Ray actor (`moemesh.ray_mesh` places them): its process, address, health, stop.

The actor runs its service as a child process, with the flags and environment
`moemesh up` gives it, and reads its ready JSON from ``--ready-fd``: the engine
keeps its own threads, event loop and signal handling, exactly as under the
local supervisor. The child dies with the actor (PR_SET_PDEATHSIG, SIGKILL)
and the actor with the child (so that Ray restarts both, in the same bundle).
A restart binds the ports the first start bound, recorded in a small file on
the node (addresses only, never a credential).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import pathlib
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from moemesh.supervisor import CLUSTER_TOKEN_ENV, KV_TIER_SECRET_ENV, METRICS_DEFAULTS, ServiceFailed

READY_TIMEOUT = 300.0  # seconds a service may take to load and report ready
STOP_GRACE = 15.0
REDIS_READY_TIMEOUT = 30.0  # seconds redis-server may take to answer a ping


@dataclass(frozen=True, repr=False)
class ServiceSpec:
    """How an actor starts its service: module and flags, the flags that carry ports, and its environment."""

    name: str
    argv: tuple[str, ...]  # after `python -m`, or a full command line when `module` is False
    ports: Mapping[str, str] = field(default_factory=dict)  # flag -> the ready key of the address it binds
    requested_ports: Mapping[str, int] = field(default_factory=dict)  # flag -> port of the first start (0: free)
    env: Mapping[str, str] = field(default_factory=dict)  # credentials and settings, added to the environment
    module: bool = True
    redis_password: str | None = None  # a redis-server: configured on stdin, pinged instead of a ready pipe
    log_dir: str | None = None

    def __repr__(self) -> str:
        return f"ServiceSpec({self.name})"  # never the environment: it holds the credentials


class ServiceActor:
    """A Ray actor that runs one service process and dies with it (so that Ray restarts both)."""

    def __init__(self, spec: ServiceSpec) -> None:
        import ray

        context = ray.get_runtime_context()
        self.spec = spec
        self.host = _node_address(context.get_node_id())
        self.state = _state_dir() / f"{context.get_actor_id()}.json"
        remembered = _read_json(self.state)  # only a restart of this very actor finds one (actor ids are unique)
        self.bound: dict = remembered.get("bound", {})
        self.restarts = remembered.get("restarts", -1) + 1
        self.stopping = False
        self.info = self._start()
        self.state.write_text(json.dumps({"bound": self.bound, "restarts": self.restarts}))  # addresses only
        threading.Thread(target=self._exit_with_service, name="watch service", daemon=True).start()

    def describe(self) -> dict:
        """Its service's ready document, with pid, node, and how often Ray restarted this actor."""
        return {**self.info, "restarts": self.restarts, "alive": self.process.poll() is None}

    def stop(self, grace: float = STOP_GRACE) -> int | None:
        """SIGTERM the service (a worker drains), SIGKILL after `grace` seconds; its exit status."""
        self.stopping = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.state.unlink(missing_ok=True)
        return self.process.wait()

    # ---- start -------------------------------------------------------------
    def _start(self) -> dict:
        argv = [*self._command(), "--host" if self.spec.module else "--bind", self.host]
        ports = {flag: self._port(flag) for flag in self.spec.ports}
        if self.spec.redis_password is not None:  # no ready pipe: it binds a port chosen here
            ports = {flag: port or _free_port(self.host) for flag, port in ports.items()}
            self.bound.update(ports)
        for flag, port in ports.items():
            argv += [flag, str(port)]
        if self.spec.redis_password is not None:
            return self._start_redis(argv, ports["--port"])
        read_fd, write_fd = os.pipe()
        try:
            self.process = self._spawn([*argv, "--ready-fd", str(write_fd)], pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        info = {"pid": self.process.pid, "node_ip": self.host, **json.loads(self._ready_line(read_fd))}
        for flag, key in self.spec.ports.items():
            self.bound.setdefault(flag, int(info[key].rsplit(":", 1)[1]))
        return info

    def _command(self) -> list[str]:
        return [sys.executable, "-m", *self.spec.argv] if self.spec.module else list(self.spec.argv)

    def _port(self, flag: str) -> int:
        """The port a restart binds again (as the local supervisor does), else the one asked for."""
        return self.bound.get(flag) or self.spec.requested_ports.get(flag, 0)

    def _spawn(self, argv: list[str], pass_fds: tuple[int, ...] = (), stdin=subprocess.DEVNULL) -> subprocess.Popen:
        output = None
        if self.spec.log_dir:
            pathlib.Path(self.spec.log_dir).mkdir(parents=True, exist_ok=True)
            output = open(pathlib.Path(self.spec.log_dir) / f"{self.spec.name}.log", "ab")
        try:
            return subprocess.Popen(argv, pass_fds=pass_fds, env={**_inherited_env(), **self.spec.env}, stdin=stdin,
                                    stdout=output, stderr=output, start_new_session=True, preexec_fn=_die_with_actor)
        finally:
            if output is not None:
                output.close()

    def _ready_line(self, read_fd: int) -> str:
        """The service's ready line; ServiceFailed when it exits first or stays silent past READY_TIMEOUT."""
        with os.fdopen(read_fd) as pipe:
            readable, _, _ = select.select([pipe], [], [], READY_TIMEOUT)  # EOF (the child exited) is readable too
            line = pipe.readline().strip() if readable else ""
        if not line:
            self.stopping = True
            self.process.kill()
            raise ServiceFailed(f"{self.spec.name} did not become ready (exit {self.process.wait()})"
                                f"{self._log_hint()}")
        return line

    def _start_redis(self, argv: list[str], port: int) -> dict:
        """redis-server with its password on stdin (never the command line), pinged until it answers."""
        import redis

        self.process = self._spawn(argv, stdin=subprocess.PIPE)
        self.process.stdin.write(f"requirepass {self.spec.redis_password}\n".encode())
        self.process.stdin.close()
        client = redis.Redis(host=self.host, port=port, password=self.spec.redis_password, socket_timeout=0.5)
        deadline = time.monotonic() + REDIS_READY_TIMEOUT
        while self.process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    return {"pid": self.process.pid, "node_ip": self.host, "address": f"{self.host}:{port}"}
            time.sleep(0.05)  # redis-server has no readiness pipe
        self.stopping = True
        self.process.kill()
        raise ServiceFailed(f"{self.spec.name}: redis-server did not answer on {self.host}:{port}{self._log_hint()}")

    def _log_hint(self) -> str:
        return f" (see {self.spec.log_dir}/{self.spec.name}.log on {self.host})" if self.spec.log_dir else ""

    def _exit_with_service(self) -> None:
        """A service that exits on its own takes this actor's process with it: Ray then restarts the actor."""
        code = self.process.wait()
        if not self.stopping:
            print(f"moemesh: {self.spec.name} (pid {self.process.pid}) exited ({code}); its actor exits for Ray to "
                  f"restart it", file=sys.stderr, flush=True)
            os._exit(1)



# ---- on the actor's node ---------------------------------------------------------------------------------------------
def _state_dir() -> pathlib.Path:
    """Where an actor records the ports its service bound, for its restart on the same node (no secrets)."""
    path = pathlib.Path(tempfile.gettempdir()) / f"moemesh-ray-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _node_address(node_id: str) -> str:
    """The address Ray knows node `node_id` by (what the other nodes dial; loopback for a local instance)."""
    import ray

    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)


def _read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _free_port(host: str) -> int:
    from moemesh.cache.embedded import free_port

    return free_port(host)


def _inherited_env() -> dict[str, str]:
    """The actor's environment less the mesh-wide credentials (a service gets only those it needs, by name), with
    metrics on (a free port, in the ready document) unless set, as under `moemesh up`."""
    return METRICS_DEFAULTS | {k: v for k, v in os.environ.items() if k not in (CLUSTER_TOKEN_ENV, KV_TIER_SECRET_ENV)}


def _die_with_actor() -> None:
    """preexec_fn: SIGKILL the service when its actor's process dies.

    SIGKILL, not the local supervisor's SIGTERM: an actor removed by Ray owns nothing any more, so its worker
    must not drain for half a minute holding streams; they fail over at once.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
