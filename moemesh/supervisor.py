"""Runs the whole mesh as child processes on one machine (``moemesh up``) and keeps it running.

Start order: Redis (unless an external one is given), the scheduler, then the
workers and the gateway at once (the gateway needs only the scheduler, and
starting it while the workers load their models takes about 4 of 14 seconds
off a start on 2 cores); the first of them to fail stops the start. Each
service reports its bound address on a pipe once it is ready, so ports can be
0 and nothing is polled. Stop order: gateway, workers, scheduler, Redis, each
service getting SIGTERM and a grace period before SIGKILL. Children die with
the supervisor even if it is killed (PR_SET_PDEATHSIG).

Like a small orchestrator, the supervisor restarts a child that exits (any
child: a worker, the embedded Redis, the scheduler, the gateway) after a
backoff, on the port it had, so the others reconnect by themselves: workers
re-register with a restarted scheduler, the gateway's channel reconnects, the
caches' Redis clients find Redis again on its port. A restarted worker takes a
new port and registers itself. Losing a child never stops the mesh; only
Ctrl-C / SIGTERM does, or a child in a crash loop (`RestartPolicy`).

With `ep_size` N > 1 each worker is an expert-parallel replica of N
processes: its expert shards (ranks 1..N-1, `shard-<i>-<rank>`) start first,
then rank 0 (`worker-<i>`) with their addresses. A restarted shard binds the
port it had, so that rank 0 (restarted by its own engine-failure exit when it
loses the shard) reconnects to the same addresses.

Each run has its own credentials (`MeshSecrets`): they reach the children
through their environment only, never their command line, the ready file or
a log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
import secrets
import signal
import sys
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from moemesh.cache.client import connect, reachable
from moemesh.cache.embedded import free_port, redis_server_argv
from moemesh.services.core.processes import die_with_parent

log = logging.getLogger(__name__)

READY_TIMEOUT = 300.0  # seconds a service may take to load and report ready
STOP_GRACE = 15.0

# `moemesh up`'s own environment may carry the run's credentials; a fresh random one is made for each unset.
CLUSTER_TOKEN_ENV = "MOEMESH_CLUSTER_TOKEN"
KV_TIER_SECRET_ENV = "MOEMESH_KV_TIER_SECRET"
MIN_SECRET_LENGTH = 16  # characters of a given credential (a generated one has 43)


@dataclass(frozen=True)
class MeshOptions:
    """What ``moemesh up`` starts."""

    model_dir: pathlib.Path
    workers: int = 1
    port: int = 50051
    http_port: int | None = 8000
    host: str = "127.0.0.1"
    redis_url: str | None = None
    embedding_model_dir: pathlib.Path | None = None
    device: str = "cpu"
    dtype: str = "auto"
    max_num_seqs: int | None = None  # None: the worker's own default
    threads_per_worker: int = 0
    log_dir: pathlib.Path | None = None
    tls_dir: pathlib.Path | None = None  # mutual TLS between the services (made by `moemesh certs`)
    ep_size: int = 1  # processes per replica: rank 0 and ep_size - 1 expert shards
    ep_placement: str | None = None  # expert -> rank map for every replica (None: contiguous)

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise ValueError(f"ep_size: at least 1, got {self.ep_size}")
        if self.ep_placement and self.ep_size == 1:
            raise ValueError("ep_placement: needs ep_size > 1")


@dataclass(frozen=True, repr=False)
class MeshSecrets:
    """The credentials of one run: the cluster token every service checks, and the KV tier's MAC secret."""

    cluster_token: str
    kv_tier_secret: str

    @classmethod
    def for_this_run(cls, environ: Mapping[str, str]) -> MeshSecrets:
        """The ones given in `environ` (MOEMESH_CLUSTER_TOKEN, MOEMESH_KV_TIER_SECRET), else fresh random ones.

        A given one shorter than MIN_SECRET_LENGTH raises ValueError naming its variable.
        """
        values = {}
        for name, var in (("cluster_token", CLUSTER_TOKEN_ENV), ("kv_tier_secret", KV_TIER_SECRET_ENV)):
            given = environ.get(var)
            if given and len(given) < MIN_SECRET_LENGTH:
                raise ValueError(f"{var}: at least {MIN_SECRET_LENGTH} characters are required (got {len(given)})")
            values[name] = given or secrets.token_urlsafe(32)  # 32 random bytes, 43 characters
        return cls(**values)

    def __repr__(self) -> str:
        return "MeshSecrets(<redacted>)"


@dataclass(frozen=True)
class RestartPolicy:
    """When a child that exited is started again, and when the supervisor gives up and stops the mesh."""

    first_delay: float = 0.5  # seconds before the first restart; doubles with each quick exit
    max_delay: float = 30.0
    stable_after: float = 60.0  # a child up this long starts its backoff afresh when it next exits
    crash_loop_exits: int = 5  # this many exits of one child ...
    crash_loop_window: float = 60.0  # ... within this many seconds is a crash loop: the mesh stops

    def delay(self, quick_exits: int) -> float:
        """Seconds to wait before restarting a child that exited `quick_exits` times in a row without settling."""
        return min(self.first_delay * 2 ** max(quick_exits - 1, 0), self.max_delay)


@dataclass
class Child:
    """One service of the mesh: how it is started, its current process, and its restart history."""

    name: str
    argv: Callable[[], list[str]]  # built afresh at each start: a restart reuses the port the last run bound
    env: Mapping[str, str] = field(default_factory=dict)  # added to the supervisor's environment (secrets, URLs)
    announces: bool = True  # reports its address on a ready pipe (False: redis-server, pinged instead)
    process: asyncio.subprocess.Process | None = None
    info: dict = field(default_factory=dict)  # its ready line and pid
    bound: dict = field(default_factory=dict)  # the addresses it first reported, kept across failed restarts
    restarts: int = 0
    started_at: float = 0.0
    quick_exits: int = 0  # exits in a row, each before the child had stayed up `stable_after`
    exits: deque[float] = field(default_factory=deque)  # monotonic times of its recent exits


class ServiceFailed(RuntimeError):
    """A service exited or never became ready."""


class CrashLoop(ServiceFailed):
    """A child keeps exiting: restarting it again would hide the fault, so the mesh stops."""


class Mesh:
    """The processes of one local mesh, kept running by `supervise`."""

    def __init__(self, options: MeshOptions, *, credentials: MeshSecrets | None = None,
                 policy: RestartPolicy = RestartPolicy(), publish: Callable[[dict], None] | None = None) -> None:
        self.options = options
        self.credentials = credentials or MeshSecrets.for_this_run(os.environ)
        self.policy = policy
        self.publish = publish  # called with the new ready document after each restart
        self.children: list[Child] = []
        self.redis_url = options.redis_url

    # ---- start -------------------------------------------------------------
    async def start(self) -> dict:
        """Start every service and return what the ready file holds."""
        o = self.options
        if self.redis_url is None:
            port = free_port(o.host)
            self.redis_url = f"redis://{o.host}:{port}/0"
            await self._launch(self._add(Child("redis", lambda: redis_server_argv(port, host=o.host),
                                               announces=False)))
        scheduler = self._add(Child("scheduler", lambda: self._scheduler_argv(scheduler),
                                    {"MOEMESH_SCHEDULER_CLUSTER_TOKEN": self.credentials.cluster_token}))
        await self._launch(scheduler)
        replicas = [self._add_replica(i, scheduler) for i in range(o.workers)]  # in order: worker-0 first
        gateway = self._add(Child("gateway", lambda: self._gateway_argv(gateway, scheduler.bound["address"]),
                                  {"MOEMESH_GATEWAY_CLUSTER_TOKEN": self.credentials.cluster_token,
                                   "MOEMESH_GATEWAY_REDIS_URL": self.redis_url}))
        # The gateway needs only the scheduler: it starts while the workers load their models (it learns the
        # served models from the scheduler as they register), and the mesh is ready when all of them are.
        await _all(*[self._start_replica(shards, worker) for shards, worker in replicas], self._launch(gateway))
        return self.ready()

    def _add_replica(self, index: int, scheduler: Child) -> tuple[list[Child], Child]:
        """The children of worker `index`: its expert shards (with ep_size > 1), then its rank 0 (stopped first)."""
        group = f"replica-{index}"
        shards = [self._add(self._shard_child(index, rank, group, scheduler)) for rank in range(1, self.options.ep_size)]
        worker = self._add(Child(f"worker-{index}", lambda: self._worker_argv(scheduler.bound["address"], group,
                                                                              shards), self._worker_env()))
        return shards, worker

    async def _start_replica(self, shards: list[Child], worker: Child) -> None:
        """Start a replica's shards, then its rank 0 with their addresses."""
        await asyncio.gather(*[self._launch(s) for s in shards])
        await self._launch(worker)

    def ready(self) -> dict:
        """The ready file's document: every service's address, pid and restart count (never a secret)."""
        infos = {c.name: {**c.info, "restarts": c.restarts} for c in self.children}
        redis = {"url": redact_url(self.redis_url), "embedded": self.options.redis_url is None}
        if "redis" in infos:
            redis.update(pid=infos["redis"]["pid"], restarts=infos["redis"]["restarts"])
        ready = {
            "gateway": infos.get("gateway"),
            "scheduler": infos.get("scheduler"),
            "workers": [info for name, info in infos.items() if name.startswith("worker-")],
            "redis": redis,
            "supervisor_pid": os.getpid(),
            "tls_dir": str(self.options.tls_dir) if self.options.tls_dir else None,
        }
        if self.options.ep_size > 1:
            ready["shards"] = [info for name, info in infos.items() if name.startswith("shard-")]
        return ready

    def _add(self, child: Child) -> Child:
        self.children.append(child)
        return child

    def _tls_args(self) -> list[str]:
        return ["--tls-dir", str(self.options.tls_dir)] if self.options.tls_dir else []

    def _scheduler_argv(self, scheduler: Child) -> list[str]:
        port = _bound_port(scheduler.bound.get("address"), 0)  # a restarted scheduler keeps its address
        return [*_module("moemesh.services.scheduler.main"), "--host", self.options.host, "--port", str(port),
                *self._tls_args()]

    def _worker_argv(self, scheduler_address: str, group: str = "", shards: Sequence[Child] = ()) -> list[str]:
        o = self.options
        args = [*_module("moemesh.worker.server.main"), "--host", o.host, "--port", "0",
                "--scheduler", scheduler_address, "--model-dir", str(o.model_dir), "--device", o.device,
                "--dtype", o.dtype, *self._tls_args()]
        if shards:  # rank 0 of an expert-parallel replica: its shards' first addresses (a restart keeps them)
            args += ["--replica-group", group, "--ep-shards", ",".join(s.bound["address"] for s in shards)]
            if o.ep_placement:
                args += ["--ep-placement", o.ep_placement]
        if o.max_num_seqs is not None:
            args += ["--max-num-seqs", str(o.max_num_seqs)]
        if o.threads_per_worker:
            args += ["--num-threads", str(o.threads_per_worker)]
        if o.embedding_model_dir is not None:
            args += ["--embedding-model-dir", str(o.embedding_model_dir)]
        return args

    def _shard_child(self, index: int, rank: int, group: str, scheduler: Child) -> Child:
        shard = Child(f"shard-{index}-{rank}", lambda: self._shard_argv(shard, group, rank, scheduler.bound["address"]),
                      self._shard_env())
        return shard

    def _shard_argv(self, shard: Child, group: str, rank: int, scheduler_address: str) -> list[str]:
        o = self.options
        port = _bound_port(shard.bound.get("address"), 0)  # a restarted shard keeps its address: rank 0 dials it
        args = [*_module("moemesh.worker.server.shard"), "--host", o.host, "--port", str(port),
                "--scheduler", scheduler_address, "--replica-group", group, "--rank", str(rank),
                "--world-size", str(o.ep_size), "--model-dir", str(o.model_dir), "--device", o.device,
                "--dtype", o.dtype, *self._tls_args()]
        if o.ep_placement:
            args += ["--placement", o.ep_placement]
        if o.threads_per_worker:
            args += ["--num-threads", str(o.threads_per_worker)]
        return args

    def _shard_env(self) -> dict[str, str]:
        return {"MOEMESH_SHARD_CLUSTER_TOKEN": self.credentials.cluster_token}

    def _worker_env(self) -> dict[str, str]:
        return {"MOEMESH_WORKER_CLUSTER_TOKEN": self.credentials.cluster_token,
                "MOEMESH_WORKER_KV_TIER_SECRET": self.credentials.kv_tier_secret,
                "MOEMESH_WORKER_KV_TIER_URL": self.redis_url}

    def _gateway_argv(self, gateway: Child, scheduler_address: str) -> list[str]:
        o = self.options
        args = [*_module("moemesh.gateway.main"), "--host", o.host,
                "--port", str(_bound_port(gateway.bound.get("address"), o.port)),
                "--scheduler", scheduler_address, *self._tls_args()]
        if o.http_port is not None:
            args += ["--http-port", str(_bound_port(gateway.bound.get("http_address"), o.http_port))]
        return args

    # ---- one child's start -------------------------------------------------
    async def _launch(self, child: Child) -> None:
        """Start `child` and wait until it serves; ServiceFailed if it exits or stays silent first."""
        child.started_at = time.monotonic()
        if not child.announces:
            await self._spawn(child)
            await self._wait_for_redis(child)
            return
        read_fd, write_fd = os.pipe()
        try:
            await self._spawn(child, ("--ready-fd", str(write_fd)), pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        child.info.update(json.loads(await self._read_ready(child, read_fd)))
        for key in ("address", "http_address"):
            child.bound.setdefault(key, child.info.get(key))
        log.info("service ready", extra={"service": child.name, "info": child.info})

    async def _spawn(self, child: Child, extra_args: tuple[str, ...] = (), pass_fds: tuple[int, ...] = ()) -> None:
        output = None
        if self.options.log_dir is not None:
            self.options.log_dir.mkdir(parents=True, exist_ok=True)
            output = open(self.log_file(child), "ab")  # owned by the child
            if child.restarts:
                output.write(f"--- moemesh: restart {child.restarts}\n".encode())
                output.flush()
        try:
            child.process = await asyncio.create_subprocess_exec(
                *child.argv(), *extra_args, pass_fds=pass_fds, env={**_inherited_env(), **child.env},
                stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=output,
                start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops children in order
                preexec_fn=die_with_parent,
            )
        finally:
            if output is not None:
                output.close()
        child.info = {"pid": child.process.pid}

    async def _read_ready(self, child: Child, read_fd: int) -> str:
        """The child's ready line, or ServiceFailed if it exits or times out first."""
        reader = asyncio.create_task(asyncio.to_thread(_read_line, read_fd))
        exited = asyncio.create_task(child.process.wait())
        done, _ = await asyncio.wait({reader, exited}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        line = (await reader).strip() if reader in done or exited in done else ""
        if not line:
            # The pipe closed without a line: the child is exiting; give it a moment to report its code.
            await asyncio.wait({exited}, timeout=2.0)
            if child.process.returncode is None:  # silent past the deadline: a restart must not find it alive
                await _terminate(child.process, STOP_GRACE)
            raise ServiceFailed(f"{child.name} did not become ready ({describe_exit(child.process.returncode)})"
                                f"{self._log_hint(child)}")
        exited.cancel()
        return line

    async def _wait_for_redis(self, child: Child) -> None:
        client = connect(self.redis_url, timeout=0.5)
        try:
            for _ in range(200):  # redis-server has no readiness pipe: ping until it answers (about 10 s)
                if child.process.returncode is not None:
                    break
                if await reachable(client):
                    return
                await asyncio.sleep(0.05)
            await _terminate(child.process, STOP_GRACE)  # a restart must not find a silent one still holding the port
            raise ServiceFailed(f"embedded redis-server did not answer at {self.redis_url}{self._log_hint(child)}")
        finally:
            await client.aclose()

    def log_file(self, child: Child) -> pathlib.Path | None:
        return self.options.log_dir / f"{child.name}.log" if self.options.log_dir is not None else None

    def _log_hint(self, child: Child) -> str:
        path = self.log_file(child)
        return f" (see {path})" if path is not None else ""

    # ---- supervise ---------------------------------------------------------
    async def supervise(self) -> None:
        """Restart every child that exits, until cancelled; CrashLoop when one keeps exiting."""
        watchers = [asyncio.create_task(self._keep_running(c), name=f"supervise {c.name}") for c in self.children]
        try:
            done, _ = await asyncio.wait(watchers, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)

    async def _keep_running(self, child: Child) -> None:
        while True:
            code = await child.process.wait()
            delay = self._note_exit(child, code)
            log.warning("moemesh: %s (pid %d) exited (%s); restart %d in %.3g s", child.name, child.process.pid,
                        describe_exit(code), child.restarts + 1, delay)
            await asyncio.sleep(delay)
            child.restarts += 1
            try:
                await self._launch(child)
            except ServiceFailed as exc:
                log.warning("moemesh: %s", exc)  # its exit is counted at the top of the loop
                continue
            log.warning("moemesh: %s is back (pid %d, restart %d)", child.name, child.process.pid, child.restarts)
            if self.publish is not None:
                self.publish(self.ready())

    def _note_exit(self, child: Child, code: int) -> float:
        """Record an exit; the delay before the restart, or CrashLoop when there were too many of late."""
        now = time.monotonic()
        child.quick_exits = 1 if now - child.started_at >= self.policy.stable_after else child.quick_exits + 1
        child.exits.append(now)
        while child.exits and now - child.exits[0] > self.policy.crash_loop_window:
            child.exits.popleft()
        if len(child.exits) >= self.policy.crash_loop_exits:
            where = f"; see its log {self.log_file(child)}" if self.options.log_dir is not None else ""
            raise CrashLoop(f"{child.name} exited {len(child.exits)} times within "
                            f"{self.policy.crash_loop_window:.0f} s (last: {describe_exit(code)}); "
                            f"giving up{where}")
        return self.policy.delay(child.quick_exits)

    # ---- stop --------------------------------------------------------------
    async def stop(self) -> None:
        """SIGTERM each service, newest first; SIGKILL what outlives its grace. (Cancel `supervise` first.)"""
        for child in reversed(self.children):
            if child.process is not None:
                await _terminate(child.process, STOP_GRACE)
        self.children.clear()


def describe_exit(code: int | None) -> str:
    """`code 1`, `signal SIGKILL`, or `still running`, from a returncode."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def redact_url(url: str | None) -> str | None:
    """`url` with any password replaced by `***` (for the ready file and the banner)."""
    if not url:
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _module(name: str) -> list[str]:
    return [sys.executable, "-m", name]


def _bound_port(address: str | None, default: int) -> int:
    """The port of a `host:port` a child reported (what its restart binds again), or `default` before it had one."""
    return int(address.rsplit(":", 1)[1]) if address else default


# Metrics are on under `moemesh up`, each service on a free port (named in the ready file and the banner), unless
# the environment sets a port already.
METRICS_DEFAULTS = {f"MOEMESH_{service}_METRICS_PORT": "0" for service in ("GATEWAY", "SCHEDULER", "WORKER")}


def _inherited_env() -> dict[str, str]:
    """The supervisor's environment without the run's credentials (a child gets only those it needs, by name),
    with metrics on unless set."""
    inherited = {k: v for k, v in os.environ.items() if k not in (CLUSTER_TOKEN_ENV, KV_TIER_SECRET_ENV)}
    return METRICS_DEFAULTS | inherited


async def _all(*starts: Awaitable[None]) -> None:
    """Run `starts` at once; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(start) for start in starts]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _read_line(fd: int) -> str:
    """The first line written to `fd` ("" when its writer closed it first)."""
    with os.fdopen(fd, "r") as pipe:
        return pipe.readline()


async def _terminate(process: asyncio.subprocess.Process, grace: float) -> None:
    if process.returncode is not None:
        return
    try:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), grace)
    except ProcessLookupError:
        return
    except TimeoutError:
        process.kill()
        await process.wait()
