"""Runs the whole mesh as child processes on one machine (``moemesh up``).

Start order: Redis (unless an external one is given), scheduler, workers,
gateway; each service reports its bound address on a pipe once it is ready,
so ports can be 0 and nothing is polled. Stop order is the reverse, each
service getting SIGTERM and a grace period before SIGKILL. Children die with
the supervisor even if it is killed (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
import signal
import sys
from dataclasses import dataclass, field

from moemesh.cache.client import connect, reachable
from moemesh.cache.embedded import free_port, redis_server_argv
from moemesh.services.core.processes import die_with_parent

log = logging.getLogger(__name__)

READY_TIMEOUT = 300.0  # seconds a service may take to load and report ready
STOP_GRACE = 15.0


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


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    info: dict = field(default_factory=dict)


class ServiceFailed(RuntimeError):
    """A service exited or never became ready."""


class Mesh:
    """The processes of one local mesh."""

    def __init__(self, options: MeshOptions) -> None:
        self.options = options
        self.children: list[Child] = []
        self.redis_url = options.redis_url

    # ---- start -------------------------------------------------------------
    async def start(self) -> dict:
        """Start every service and return what the ready file holds."""
        if self.redis_url is None:
            await self._start_redis()
        tls = ["--tls-dir", str(self.options.tls_dir)] if self.options.tls_dir else []
        scheduler = await self._start_service("scheduler", "moemesh.services.scheduler.main",
                                              ["--host", self.options.host, "--port", "0", *tls])
        workers = await asyncio.gather(*[
            self._start_service(f"worker-{i}", "moemesh.worker.server.main",
                                [*self._worker_args(scheduler.info["address"]), *tls])
            for i in range(self.options.workers)
        ])
        gateway_args = ["--host", self.options.host, "--port", str(self.options.port),
                        "--scheduler", scheduler.info["address"], "--redis-url", self.redis_url, *tls]
        if self.options.http_port is not None:
            gateway_args += ["--http-port", str(self.options.http_port)]
        gateway = await self._start_service("gateway", "moemesh.gateway.main", gateway_args)
        return {
            "gateway": gateway.info,
            "scheduler": scheduler.info,
            "workers": [w.info for w in workers],
            "redis": {"url": self.redis_url, "embedded": self.options.redis_url is None},
            "supervisor_pid": os.getpid(),
            "tls_dir": str(self.options.tls_dir) if self.options.tls_dir else None,
        }

    def _worker_args(self, scheduler_address: str) -> list[str]:
        o = self.options
        args = ["--host", o.host, "--port", "0", "--scheduler", scheduler_address, "--model-dir", str(o.model_dir),
                "--device", o.device, "--dtype", o.dtype, "--kv-tier-url", self.redis_url]
        if o.max_num_seqs is not None:
            args += ["--max-num-seqs", str(o.max_num_seqs)]
        if o.threads_per_worker:
            args += ["--num-threads", str(o.threads_per_worker)]
        if o.embedding_model_dir is not None:
            args += ["--embedding-model-dir", str(o.embedding_model_dir)]
        return args

    async def _spawn(self, name: str, argv: list[str], pass_fds: tuple[int, ...] = ()) -> Child:
        stderr = None
        if self.options.log_dir is not None:
            self.options.log_dir.mkdir(parents=True, exist_ok=True)
            stderr = open(self.options.log_dir / f"{name}.log", "ab")  # owned by the child
        process = await asyncio.create_subprocess_exec(
            *argv, pass_fds=pass_fds, stdin=asyncio.subprocess.DEVNULL, stdout=stderr, stderr=stderr,
            start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops children in order
            preexec_fn=die_with_parent,
        )
        if stderr is not None:
            stderr.close()
        child = Child(name, process, {"pid": process.pid})
        self.children.append(child)
        return child

    async def _start_service(self, name: str, module: str, args: list[str]) -> Child:
        read_fd, write_fd = os.pipe()
        try:
            child = await self._spawn(name, [sys.executable, "-m", module, *args, "--ready-fd", str(write_fd)],
                                      pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        line = await self._read_ready(name, read_fd, child)
        child.info.update(json.loads(line))
        log.info("service ready", extra={"service": name, "info": child.info})
        return child

    async def _read_ready(self, name: str, read_fd: int, child: Child) -> str:
        """The child's ready line, or ServiceFailed if it exits or times out first."""
        reader = asyncio.create_task(asyncio.to_thread(_read_all, read_fd))
        exited = asyncio.create_task(child.process.wait())
        done, _ = await asyncio.wait({reader, exited}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        line = (await reader).strip() if reader in done or exited in done else ""
        if not line:
            # The pipe closed without a line: the child is exiting; give it a moment to report its code.
            await asyncio.wait({exited}, timeout=2.0)
            hint = f" (see {self.options.log_dir / (name + '.log')})" if self.options.log_dir else ""
            raise ServiceFailed(f"{name} did not become ready (exit code {child.process.returncode}){hint}")
        exited.cancel()
        return line

    async def _start_redis(self) -> None:
        port = free_port(self.options.host)
        await self._spawn("redis", redis_server_argv(port, host=self.options.host))
        self.redis_url = f"redis://{self.options.host}:{port}/0"
        client = connect(self.redis_url, timeout=0.5)
        try:
            for _ in range(200):  # redis-server has no readiness pipe: ping until it answers (about 10 s)
                if await reachable(client):
                    return
                await asyncio.sleep(0.05)
            raise ServiceFailed(f"embedded redis-server did not answer on port {port}")
        finally:
            await client.aclose()

    # ---- run and stop ------------------------------------------------------
    async def wait_for_exit(self) -> Child:
        """Return the first child whose exit ends the mesh: any service but a worker, or the last worker.

        A worker that dies while others serve is reported and left down: the
        scheduler fails its requests over to the remaining workers.
        """
        while True:
            waits = {asyncio.create_task(c.process.wait()): c for c in self.children}
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            child = waits[next(iter(done))]
            workers_left = [c for c in self.children if c.name.startswith("worker") and c.process.returncode is None]
            if not child.name.startswith("worker") or not workers_left:
                return child
            self.children.remove(child)
            print(f"moemesh: {child.name} exited with code {child.process.returncode}; "
                  f"{len(workers_left)} worker(s) still serving", file=sys.stderr, flush=True)

    async def stop(self) -> None:
        """SIGTERM each service, newest first; SIGKILL what outlives its grace."""
        for child in reversed(self.children):
            await _terminate(child.process, STOP_GRACE)
        self.children.clear()


def _read_all(fd: int) -> str:
    with os.fdopen(fd, "r") as pipe:
        return pipe.read()


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
