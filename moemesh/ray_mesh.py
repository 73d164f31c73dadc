"""The mesh on a Ray cluster (``moemesh ray up``): each service a Ray actor, each worker replica a placement group.

Ray places and restarts processes; gRPC stays the data plane. Every actor
runs its service as a child process (``python -m moemesh....main``, the
flags and environment that ``moemesh up`` gives it, the ready JSON read from
``--ready-fd``), so the engine keeps its own threads, event loop and signal
handling exactly as under the local supervisor, and the actor stays a thin
handle: address, pid, health, stop. Workers register with the scheduler as
any worker does.

Placement: the control services (Redis unless one is given, scheduler,
gateway) share one placement group; each worker replica has its own, with one
bundle per rank (an expert-parallel replica of N processes is N bundles),
PACK (its ranks on one node) unless SPREAD is asked for. A bundle asks for
GPUs when the cluster has them and its rank then runs on ``cuda``.

Failures: the child dies with its actor (SIGKILL from the kernel,
PR_SET_PDEATHSIG), so an actor removed by ``ray.kill`` or lost with its node
takes its worker's streams with it and the scheduler fails them over. An
actor whose service exits on its own ends its process, and Ray restarts it
(``max_restarts``) in the same bundle, on the same node: the scheduler,
gateway, Redis and expert shards bind the ports they had (recorded on the
node), a restarted worker takes a new port and registers itself.

Credentials: a fresh cluster token and KV-tier secret per mesh (or
MOEMESH_CLUSTER_TOKEN / MOEMESH_KV_TIER_SECRET), and a Redis password,
travel as actor arguments over Ray's own control plane and reach each service
by its environment, never a command line; Ray itself must run on a private
network, as its documentation requires.
"""

from __future__ import annotations

import os
import pathlib
import secrets
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from moemesh.local import ReadyAddresses
from moemesh.ray_service import READY_TIMEOUT, STOP_GRACE, ServiceActor, ServiceSpec
from moemesh.supervisor import CLUSTER_TOKEN_ENV, KV_TIER_SECRET_ENV, MeshSecrets, ServiceFailed

PLACEMENT_TIMEOUT = 120.0  # seconds the cluster may take to reserve a placement group's bundles
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray's placement group strategies
REDIS_MAXMEMORY_MB = 256
# Logical CPUs reserved for each control service (Redis, scheduler, gateway): they move messages, the engines compute;
# Ray counts reservations, it pins no core, so a laptop's 2 CPUs hold the control plane and one replica.
CONTROL_CPUS = 0.25


@dataclass(frozen=True)
class RayMeshOptions:
    """What ``moemesh ray up`` places on the cluster."""

    model_dir: pathlib.Path  # on every node at this path (a shared file system or the same image)
    workers: int = 1  # replicas of the model
    ep_size: int = 1  # processes (ranks) per replica: one placement group bundle each
    embedding_model_dir: pathlib.Path | None = None
    redis_url: str | None = None  # None: a password-protected redis-server actor beside the scheduler
    port: int = 50051  # gateway gRPC (0: any free port)
    http_port: int | None = 8000  # gateway HTTP (None: no HTTP API)
    scheduler_port: int = 0  # 0: a free port, kept across the scheduler actor's restarts
    device: str = "auto"  # auto: cuda where the rank's bundle holds a GPU, else cpu
    dtype: str = "auto"
    max_num_seqs: int | None = None
    cpus_per_rank: float = 1.0  # the bundle's CPUs; also the rank's torch threads
    gpus_per_rank: float | None = None  # None: 1 when the cluster has GPUs, else 0
    strategy: str = "PACK"  # of each replica's placement group
    max_restarts: int = 20  # Ray restarts a dead actor (and its service) this many times
    log_dir: pathlib.Path | None = None  # each service's log as DIR/<name>.log on its node (None: Ray's worker logs)
    tls_dir: pathlib.Path | None = None  # mutual TLS certificates, at this path on every node
    env: Mapping[str, str] = field(default_factory=dict)  # settings for every service (MOEMESH_*), not secrets

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers: at least 1, got {self.workers}")
        if self.ep_size < 1:
            raise ValueError(f"ep_size: at least 1, got {self.ep_size}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.cpus_per_rank <= 0:
            raise ValueError(f"cpus_per_rank: above 0, got {self.cpus_per_rank}")
        if self.max_restarts < -1:
            raise ValueError(f"max_restarts: -1 (forever) or more, got {self.max_restarts}")


# ---- the driver ------------------------------------------------------------------------------------------------------
@dataclass
class RayMesh(ReadyAddresses):
    """A mesh placed on Ray: its actors, placement groups, addresses and credentials."""

    options: RayMeshOptions
    credentials: MeshSecrets
    actors: dict = field(default_factory=dict)  # service name -> actor handle
    placement_groups: list = field(default_factory=list)
    ready: dict = field(default_factory=dict)  # as `moemesh up`'s ready file: addresses and pids, never a secret

    def describe(self, name: str, timeout: float = 30.0) -> dict:
        """What the actor of service `name` reports now (its pid and restarts change when Ray restarts it)."""
        import ray

        return ray.get(self.actors[name].describe.remote(), timeout=timeout)

    def stop(self) -> None:
        """Stop the gateway, then every replica at once (a worker drains), then the scheduler and Redis; then remove
        their actors and placement groups."""
        import ray

        tiers = [["gateway"], [n for n in self.actors if n.startswith(("worker-", "shard-"))], ["scheduler"], ["redis"]]
        for tier in tiers:
            actors = [self.actors.pop(name) for name in tier if name in self.actors]
            if actors:  # a dead actor's stop() fails at once: wait() only waits, it never raises
                ray.wait([actor.stop.remote() for actor in actors], num_returns=len(actors), timeout=STOP_GRACE + 5)
            for actor in actors:
                ray.kill(actor)
        for group in self.placement_groups:
            ray.util.remove_placement_group(group)
        self.placement_groups.clear()


def start_mesh_on_ray(model_dir: str | pathlib.Path, workers: int = 1, *, credentials: MeshSecrets | None = None,
                      **options) -> RayMesh:
    """Place Redis, the scheduler, `workers` replicas and the gateway on the connected Ray cluster.

    Call `ray.init(...)` first. Returns once every service is ready; ServiceFailed when one is not (the
    others are then stopped). `options` are `RayMeshOptions` fields.
    """
    return place_mesh(RayMeshOptions(model_dir=pathlib.Path(model_dir), workers=workers, **options), credentials)


def place_mesh(options: RayMeshOptions, credentials: MeshSecrets | None = None) -> RayMesh:
    """`start_mesh_on_ray` with its options as one object."""
    mesh = RayMesh(options, credentials or MeshSecrets.for_this_run(os.environ))
    try:
        _place(mesh)
    except BaseException:
        mesh.stop()
        raise
    return mesh


def _place(mesh: RayMesh) -> None:
    o = mesh.options
    control = _placement_group(mesh, [{"CPU": CONTROL_CPUS}] * (3 if o.redis_url is None else 2), "PACK")
    redis_url, bundle = o.redis_url, 0
    if redis_url is None:
        redis_url = _start_redis(mesh, control)
        bundle = 1
    token = {"cluster_token": mesh.credentials.cluster_token}
    scheduler = _start(mesh, _spec(mesh, "scheduler", ["moemesh.services.scheduler.main"], {"--port": "address"},
                                   {"--port": o.scheduler_port}, _env("SCHEDULER", token)), control, bundle)
    gpus = _gpus_per_rank(o)
    worker_env = _env("WORKER", {**token, "kv_tier_secret": mesh.credentials.kv_tier_secret, "kv_tier_url": redis_url})
    replicas = [_place_replica(mesh, i, scheduler["address"], gpus, worker_env) for i in range(o.workers)]
    gateway_ports = {"--port": "address", **({"--http-port": "http_address"} if o.http_port is not None else {})}
    _create(mesh, _spec(mesh, "gateway", ["moemesh.gateway.main", "--scheduler", scheduler["address"]], gateway_ports,
                        {"--port": o.port, "--http-port": o.http_port or 0},
                        _env("GATEWAY", {**token, "redis_url": redis_url})), control, bundle + 1, 0.0)
    workers = [_wait(mesh, name) for name in replicas]  # the replicas and the gateway start side by side
    gateway = _wait(mesh, "gateway")
    mesh.ready = {"gateway": gateway, "scheduler": scheduler, "workers": workers,
                  "redis": {"url": _redact(redis_url), "embedded": o.redis_url is None},
                  "shards": [_wait(mesh, n) for n in mesh.actors if n.startswith("shard-")]}


def _place_replica(mesh: RayMesh, index: int, scheduler: str, gpus: float, worker_env: dict) -> str:
    """Reserve replica `index`'s bundles (one per rank), start its expert shards, then its rank 0; rank 0's name."""
    o = mesh.options
    bundle = {"CPU": o.cpus_per_rank, **({"GPU": gpus} if gpus else {})}
    group = _placement_group(mesh, [bundle] * o.ep_size, o.strategy)
    device = ("cuda" if gpus else "cpu") if o.device == "auto" else o.device
    common = ["--scheduler", scheduler, "--model-dir", str(o.model_dir), "--device", device, "--dtype", o.dtype,
              "--num-threads", str(max(1, int(o.cpus_per_rank)))]
    replica_group = f"replica-{index}"
    shards = []
    for rank in range(1, o.ep_size):
        shard_argv = ["moemesh.worker.server.shard", *common, "--replica-group", replica_group, "--rank", str(rank),
                      "--world-size", str(o.ep_size)]
        spec = _spec(mesh, f"shard-{index}-{rank}", shard_argv, {"--port": "address"}, {},
                     _env("SHARD", {"cluster_token": mesh.credentials.cluster_token}))
        shards.append(_start(mesh, spec, group, rank, gpus))
    argv = ["moemesh.worker.server.main", "--port", "0", *common]
    if shards:
        argv += ["--replica-group", replica_group, "--ep-shards", ",".join(s["address"] for s in shards)]
    if o.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(o.max_num_seqs)]
    if o.embedding_model_dir is not None:
        argv += ["--embedding-model-dir", str(o.embedding_model_dir)]
    name = f"worker-{index}"
    _create(mesh, _spec(mesh, name, argv, {}, {}, worker_env), group, 0, gpus)  # replicas load side by side
    return name


def _start_redis(mesh: RayMesh, control) -> str:
    """A redis-server actor with a fresh password; its URL (which reaches the services by environment only)."""
    from moemesh.cache.embedded import redis_server_argv

    password = secrets.token_urlsafe(24)
    binary, *options = _without_flag(_without_flag(redis_server_argv(0, maxmemory_mb=REDIS_MAXMEMORY_MB), "--bind"),
                                     "--port")  # the actor adds --bind (its node's address) and --port (kept)
    argv = [binary, "-", *options]  # "-": configuration on stdin too, where the actor writes the password
    spec = ServiceSpec("redis", tuple(argv), ports={"--port": "address"}, module=False, redis_password=password,
                       log_dir=_log_dir(mesh.options))
    info = _start(mesh, spec, control, 0)
    return f"redis://:{password}@{info['address']}/0"


def _spec(mesh: RayMesh, name: str, argv: list[str], ports: dict, requested: dict, env: dict) -> ServiceSpec:
    settings = {k: v for k, v in mesh.options.env.items() if k not in (CLUSTER_TOKEN_ENV, KV_TIER_SECRET_ENV)}
    requested = {k: v for k, v in requested.items() if k in ports}
    return ServiceSpec(name, (*argv, *_tls_args(mesh.options)), ports, requested, {**settings, **env},
                       log_dir=_log_dir(mesh.options))


def _start(mesh: RayMesh, spec: ServiceSpec, group, bundle: int, gpus: float = 0.0) -> dict:
    _create(mesh, spec, group, bundle, gpus)
    return _wait(mesh, spec.name)


def _create(mesh: RayMesh, spec: ServiceSpec, group, bundle: int, gpus: float) -> None:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cpus = mesh.options.cpus_per_rank if spec.name.startswith(("worker-", "shard-")) else CONTROL_CPUS
    actor_class = ray.remote(ServiceActor).options(
        num_cpus=cpus, num_gpus=gpus, max_restarts=mesh.options.max_restarts, max_task_retries=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle))
    mesh.actors[spec.name] = actor_class.remote(spec)


def _wait(mesh: RayMesh, name: str) -> dict:
    """The service's ready document, once its actor has started it; ServiceFailed naming it otherwise."""
    import ray

    try:
        return mesh.describe(name, timeout=READY_TIMEOUT)
    except ray.exceptions.GetTimeoutError:
        raise ServiceFailed(f"{name} did not become ready within {READY_TIMEOUT:.0f} s") from None
    except ray.exceptions.RayActorError as exc:
        raise ServiceFailed(f"{name} did not start: {exc}") from None


def _placement_group(mesh: RayMesh, bundles: list[dict], strategy: str):
    import ray
    from ray.util.placement_group import placement_group

    group = placement_group(bundles, strategy=strategy)
    mesh.placement_groups.append(group)
    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT)
    except ray.exceptions.GetTimeoutError:
        raise ServiceFailed(f"the cluster did not reserve {len(bundles)} bundle(s) of {bundles[0]} ({strategy}) "
                            f"within {PLACEMENT_TIMEOUT:.0f} s; it has {ray.available_resources()}") from None
    return group


def _gpus_per_rank(options: RayMeshOptions) -> float:
    import ray

    if options.gpus_per_rank is not None:
        return options.gpus_per_rank
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _env(service: str, values: dict[str, str]) -> dict[str, str]:
    """`values` as the service's environment variables (MOEMESH_<SERVICE>_<NAME>)."""
    return {f"MOEMESH_{service}_{name.upper()}": value for name, value in values.items()}


def _tls_args(options: RayMeshOptions) -> list[str]:
    return ["--tls-dir", str(options.tls_dir)] if options.tls_dir else []


def _log_dir(options: RayMeshOptions) -> str | None:
    return str(options.log_dir) if options.log_dir is not None else None


def _without_flag(argv: list[str], flag: str) -> list[str]:
    at = argv.index(flag)
    return argv[:at] + argv[at + 2:]


def _redact(url: str) -> str:
    from moemesh.supervisor import redact_url

    return redact_url(url)


# ---- `moemesh ray up` ------------------------------------------------------------------------------------------------
WATCH_INTERVAL = 10.0  # seconds between two looks at the actors while `moemesh ray up` runs
ESSENTIAL = ("scheduler", "gateway")  # without one of these the mesh cannot serve: `ray up` stops


def serve(options: RayMeshOptions, credentials: MeshSecrets, *, address: str | None, on_ready) -> int:
    """Connect to Ray (`address`, else RAY_ADDRESS or a cluster this machine runs, else a new local one), place the
    mesh, call `on_ready(ready)`, and block until SIGINT/SIGTERM (0) or an essential actor is gone for good (1)."""
    import ray

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(address=address, logging_level="WARNING")
    mesh = None
    try:
        mesh = place_mesh(options, credentials)
        on_ready(mesh.ready)
        return _watch(mesh, stop)
    except ServiceFailed as exc:
        print(f"moemesh: {exc}", file=sys.stderr)
        return 1
    finally:
        print("moemesh: stopping…", file=sys.stderr)
        if mesh is not None:
            mesh.stop()
        ray.shutdown()


def _watch(mesh: RayMesh, stop: threading.Event) -> int:
    """Report actors that Ray gave up restarting (past max_restarts); 1 when an essential one is among them."""
    import ray

    reported: set[str] = set()
    while not stop.wait(WATCH_INTERVAL):
        for name in list(mesh.actors):
            try:
                mesh.describe(name, timeout=WATCH_INTERVAL)
            except ray.exceptions.GetTimeoutError:
                continue  # being restarted (or busy): looked at again next time
            except ray.exceptions.RayActorError as exc:
                if name not in reported:
                    reported.add(name)
                    print(f"moemesh: {name}'s actor is gone for good ({type(exc).__name__}); the mesh serves on "
                          f"without it", file=sys.stderr)
                if name in ESSENTIAL:
                    return 1
    return 0
