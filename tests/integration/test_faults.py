"""Fault injection under load, through `moemesh up`: the failure table of ARCHITECTURE.md, one fault at a time.

Every fault is injected while 16 streams are in flight (half greedy, half
sampled from a seed), and each test asserts what the user sees (no lost or
repeated token: every stream equals the undisturbed run of its request; no
hung stream: every call has a deadline and ends well before it; recovery within a stated bound) and what the supervisor does
(the dead child is restarted on its port, the ready file follows, the mesh
never stops for a lost child). A supervisor driving plain processes shows the
restart policy itself, and one test runs the services without a supervisor
against a real redis-server that is stopped and restarted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
import pytest
import redis

from moemesh.local import RunningMesh, start_mesh, stop_mesh
from moemesh.supervisor import Child, CrashLoop, Mesh, MeshOptions, RestartPolicy
from moemesh.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from tests.support.mesh import DEMO_MODEL, Service, pid_alive
from tests.support.redis_server import RedisServer

T = TypeVar("T")

PROMPTS = [f"def handler_{i}(request):\n    " for i in range(16)]
MAX_TOKENS = 128  # a few seconds of streams: a fault set after the first events lands mid-generation on a slow host
STREAM_DEADLINE = 90.0  # seconds: a stream still open then is hung (each fault here heals within seconds)
RECOVERY_BOUND = 60.0  # seconds a restarted service may take to serve again on a loaded 2-core machine
LONG_PROMPT = "The scheduler admits requests, batches them, and picks a replica for each batch of work. " * 3


# ---- requests and streams --------------------------------------------------------------------------------------------
def request(prompt: str, max_tokens: int = MAX_TOKENS, cached: bool = False,
            seed: int | None = None) -> generation_pb2.GenerateRequest:
    """A request of exactly `max_tokens`, greedy or (with `seed`) sampled at temperature 0.8 from that seed;
    `cached`: it may use the response cache (else it really runs)."""
    mode = common_pb2.CACHE_MODE_DEFAULT if cached else common_pb2.CACHE_MODE_NO_STORE
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    if seed is not None:
        sampling.temperature, sampling.seed = 0.8, seed
    return generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(text=prompt), cache_mode=mode, sampling=sampling)


def stream(i: int, max_tokens: int = MAX_TOKENS, cached: bool = False) -> generation_pb2.GenerateRequest:
    """The i-th of the 16 streams every fault is injected under: every other one sampled from a seed (a failover
    must continue a random stream exactly, not only a greedy one)."""
    return request(PROMPTS[i], max_tokens, cached, seed=None if i % 2 == 0 else 100 + i)


def streams(max_tokens: int = MAX_TOKENS, cached: bool = False) -> list[generation_pb2.GenerateRequest]:
    return [stream(i, max_tokens, cached) for i in range(len(PROMPTS))]


def collect(events) -> dict:
    out = {"ids": [], "text": "", "finish": None, "cached": False}
    for event in events:
        out["ids"] += event.token_ids
        out["text"] += event.text
        if event.finish_reason:
            out["finish"], out["cached"] = event.finish_reason, event.usage.from_response_cache
    return out


class Load:
    """Streams all sent at once, each having delivered its first event; finished by `results`."""

    def __init__(self, gateway: str, requests: list[generation_pb2.GenerateRequest]) -> None:
        self.channel = grpc.insecure_channel(gateway)
        stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.calls = [stub.Generate(r, timeout=STREAM_DEADLINE) for r in requests]
        self.firsts = [next(call) for call in self.calls]

    def assert_running(self) -> None:
        """The fault is about to hit streams still generating (a finished stream would prove nothing)."""
        running = sum(not f.finish_reason for f in self.firsts)
        assert running >= len(self.firsts) // 2, f"only {running} of {len(self.firsts)} streams are still running"

    def results(self) -> list[dict | grpc.StatusCode]:
        """Each stream's tokens and text, or the status it ended with."""
        outcomes = []
        for first, call in zip(self.firsts, self.calls):
            try:
                outcomes.append(collect([first, *call]))
            except grpc.RpcError as exc:
                outcomes.append(exc.code())
        self.channel.close()
        return outcomes


def generate(gateway: str, req: generation_pb2.GenerateRequest, timeout: float = 60.0) -> dict:
    with grpc.insecure_channel(gateway) as channel:
        return collect(generation_pb2_grpc.GenerationStub(channel).Generate(req, timeout=timeout))


def assert_identical(outcomes: list, reference: list[dict], what: str) -> None:
    for i, (got, want) in enumerate(zip(outcomes, reference, strict=True)):
        assert isinstance(got, dict), f"{what}: stream {i} failed with {got}"
        assert got["finish"] == common_pb2.FINISH_REASON_LENGTH, f"{what}: stream {i} did not complete"
        assert got["ids"] == want["ids"][:len(got["ids"])] and len(got["ids"]) == len(want["ids"]), \
            f"{what}: stream {i} lost, repeated or changed tokens"
        assert got["text"] == want["text"], f"{what}: stream {i}: text differs from the undisturbed run's"


def wait_until(probe: Callable[[], T], timeout: float, what: str) -> T:
    """`probe()`'s first truthy answer within `timeout` seconds (processes outside the test give no event to await)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = probe()
        except (grpc.RpcError, redis.RedisError, OSError):
            answer = None
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.1)


# ---- the mesh --------------------------------------------------------------------------------------------------------
def nodes(mesh: RunningMesh) -> list:
    with grpc.insecure_channel(mesh.scheduler) as channel:
        return scheduler_pb2_grpc.SchedulerStub(channel).ListNodes(
            scheduler_pb2.ListNodesRequest(), timeout=5, metadata=mesh.internal_metadata).nodes


def ready_workers(mesh: RunningMesh) -> set[str]:
    return {n.address for n in nodes(mesh) if n.state == "ready"}


def busiest_worker(mesh: RunningMesh) -> int:
    """The index (in the ready file) of the worker holding the most streams now. Load alone routes, but a heartbeat
    late on a loaded host leaves a worker unroutable for a moment, and the other may then get every stream."""
    held = {n.address: n.in_flight for n in nodes(mesh)}
    workers = mesh.read_ready()["workers"]
    index = max(range(len(workers)), key=lambda i: held.get(workers[i].get("address"), 0))
    assert held.get(workers[index].get("address"), 0) > 0, f"a worker must hold the streams: {held}"
    return index


def whole(mesh: RunningMesh) -> bool:
    """Every service runs and both workers of the ready file are routable."""
    ready = mesh.read_ready()
    return (all(pid_alive(p) for p in [*mesh.service_pids(), ready["redis"]["pid"]])
            and ready_workers(mesh) == {w.get("address") for w in ready["workers"]})


def restarted(mesh: RunningMesh, pick: Callable[[dict], dict], old_pid: int) -> dict:
    """The ready file's entry of a service once it names a new, live process."""
    def probe():
        entry = pick(mesh.read_ready())
        return entry if entry["pid"] != old_pid and pid_alive(entry["pid"]) else None
    return wait_until(probe, RECOVERY_BOUND, "the supervisor restarts the killed service")


def redis_client(mesh: RunningMesh) -> redis.Redis:
    return redis.Redis.from_url(mesh.read_ready()["redis"]["url"], socket_timeout=1)


def caches_work(gateway: str, tag: str) -> Callable[[], bool]:
    """A probe: a fresh deterministic request asked twice is answered from the response cache the second time."""
    attempt = iter(range(10**6))

    def probe() -> bool:
        prompt = f"cache probe {tag} {next(attempt)}"
        generate(gateway, request(prompt, 4, cached=True))
        return generate(gateway, request(prompt, 4, cached=True))["cached"]
    return probe


def kv_tier_works(gateway: str, client: redis.Redis, tag: str) -> Callable[[], bool]:
    """A probe: a long prompt run twice (the second a local prefix hit) puts its blocks into the Redis KV tier."""
    attempt = iter(range(10**6))

    def probe() -> bool:
        prompt = f"{tag} {next(attempt)}: {LONG_PROMPT}"
        generate(gateway, request(prompt, 2))
        generate(gateway, request(prompt, 2))
        return bool(wait_until_keys(client, "moemesh:kv:*"))
    return probe


def wait_until_keys(client: redis.Redis, pattern: str) -> list:
    deadline = time.monotonic() + 2.0  # the tier writes after the answer is sent
    while time.monotonic() < deadline:
        keys = list(client.scan_iter(pattern, count=1000))
        if keys:
            return keys
        time.sleep(0.05)
    return []


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    env = {"MOEMESH_SCHEDULER_AFFINITY_LOAD_GUARD": "0",  # load alone decides: the streams spread over both workers
           "MOEMESH_SCHEDULER_HEARTBEAT_INTERVAL": "0.5"}  # a hung worker is evicted within 1.5 s
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        running = start_mesh(tmp_path_factory.mktemp("faults"), "--workers", "2", "--no-embeddings", "--no-http")
    yield running
    if running.process.poll() is None:
        stop_mesh(running)


@pytest.fixture(scope="module")
def reference(mesh) -> list[dict]:
    """The 16 streams' answers on the undisturbed mesh."""
    answers = Load(mesh.gateway, streams()).results()
    assert all(isinstance(a, dict) and len(a["ids"]) == MAX_TOKENS for a in answers), answers
    return answers


@pytest.fixture
def healthy(mesh, reference) -> RunningMesh:
    """The mesh, whole again after the previous test's fault."""
    assert mesh.process.poll() is None, f"the supervisor stopped:\n{mesh.logs()}"
    wait_until(lambda: whole(mesh), RECOVERY_BOUND, "the mesh is whole before the next fault")
    return mesh


# ---- credentials -----------------------------------------------------------------------------------------------------
def process_env(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as environ:
        pairs = [item.split(b"=", 1) for item in environ.read().split(b"\0") if b"=" in item]
    return {k.decode(): v.decode(errors="replace") for k, v in pairs}


def process_argv(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read().replace(b"\0", b" ").decode()


def test_the_cluster_credentials_reach_each_child_by_environment_only(healthy):
    mesh, token = healthy, healthy.cluster_token
    ready = mesh.read_ready()
    scheduler = process_env(ready["scheduler"]["pid"])
    gateway = process_env(ready["gateway"]["pid"])
    workers = [process_env(w["pid"]) for w in ready["workers"]]
    assert scheduler["MOEMESH_SCHEDULER_CLUSTER_TOKEN"] == token
    assert gateway["MOEMESH_GATEWAY_CLUSTER_TOKEN"] == token
    assert gateway["MOEMESH_GATEWAY_REDIS_URL"] == ready["redis"]["url"], "the gateway's Redis comes by environment"
    secret = workers[0]["MOEMESH_WORKER_KV_TIER_SECRET"]
    assert len(secret) >= 32 and secret != token, "the KV tier's MAC secret is its own random secret"
    for worker in workers:
        assert worker["MOEMESH_WORKER_CLUSTER_TOKEN"] == token and worker["MOEMESH_WORKER_KV_TIER_SECRET"] == secret
        assert worker["MOEMESH_WORKER_KV_TIER_URL"] == ready["redis"]["url"]
    assert "MOEMESH_SCHEDULER_CLUSTER_TOKEN" not in workers[0], "a child gets only the credentials it needs"
    for env in (scheduler, gateway, *workers, process_env(ready["redis"]["pid"])):
        assert "MOEMESH_CLUSTER_TOKEN" not in env and "MOEMESH_KV_TIER_SECRET" not in env
    pids = [*mesh.service_pids(), ready["redis"]["pid"]]
    for pid in pids:
        argv = process_argv(pid)
        assert token not in argv and secret not in argv, f"a credential is on the command line of {argv!r}"
        assert "redis://" not in argv, f"a Redis URL (which may hold a password) is on a command line: {argv!r}"
    written = [mesh.ready_file.read_text(), *(p.read_text() for p in mesh.log_dir.glob("*.log"))]
    assert not [text for text in written if token in text or secret in text], "a credential was written down"


# ---- workers ---------------------------------------------------------------------------------------------------------
def test_a_worker_killed_under_16_streams_loses_no_token_and_is_restarted_and_serves_again(healthy, reference):
    mesh = healthy
    load = Load(mesh.gateway, streams())
    load.assert_running()
    index = busiest_worker(mesh)
    victim = mesh.read_ready()["workers"][index]
    os.kill(victim["pid"], signal.SIGKILL)
    assert_identical(load.results(), reference, "worker kill -9")

    back = restarted(mesh, lambda ready: ready["workers"][index], victim["pid"])
    assert back["restarts"] == victim["restarts"] + 1
    wait_until(lambda: ready_workers(mesh) == set(mesh.workers), RECOVERY_BOUND, "the new worker registers")

    def takes_traffic() -> bool:  # a load may miss it while a late heartbeat leaves it unroutable: ask again
        before = {n.address: n.routed_requests for n in nodes(mesh)}
        assert_identical(Load(mesh.gateway, streams()).results(), reference, "after the restart")
        after = {n.address: n.routed_requests for n in nodes(mesh)}
        return after.get(back["address"], 0) > before.get(back["address"], 0)

    wait_until(takes_traffic, RECOVERY_BOUND, "the restarted worker takes traffic again")


def test_a_stopped_worker_under_load_is_failed_over_and_rejoins_after_sigcont(healthy, reference):
    mesh = healthy
    load = Load(mesh.gateway, streams())
    load.assert_running()
    index = busiest_worker(mesh)
    victim = mesh.read_ready()["workers"][index]
    os.kill(victim["pid"], signal.SIGSTOP)  # hung, not dead: only the missing heartbeats tell
    try:
        started = time.monotonic()
        assert_identical(load.results(), reference, "worker SIGSTOP")
        assert time.monotonic() - started < STREAM_DEADLINE / 2, "streams of a hung worker must fail over promptly"
        assert victim["address"] not in ready_workers(mesh), "the hung worker must not be routable"
    finally:
        os.kill(victim["pid"], signal.SIGCONT)
    wait_until(lambda: victim["address"] in ready_workers(mesh), RECOVERY_BOUND, "the resumed worker re-registers")
    now = mesh.read_ready()["workers"][index]
    assert (now["pid"], now["restarts"]) == (victim["pid"], victim["restarts"]), "a paused worker is not killed"
    assert_identical(Load(mesh.gateway, streams()).results(), reference, "after SIGCONT")


def listed_models(mesh: RunningMesh) -> set[str]:
    with grpc.insecure_channel(mesh.gateway) as channel:
        return {m.id for m in models_pb2_grpc.ModelsStub(channel).ListModels(models_pb2.ListModelsRequest(),
                                                                                 timeout=5).models}


def test_with_every_replica_lost_the_model_is_unavailable_not_unknown_and_served_again_on_their_return(healthy):
    """Both workers stopped until the scheduler drops them: the model has no replica at all. The gateway saw it
    served, so a request naming it is UNAVAILABLE (HTTP 503, which clients retry), not INVALID_ARGUMENT for an
    unknown model (HTTP 400 model_not_found, which nobody retries); once a worker is back it is served again."""
    mesh = healthy
    victims = mesh.read_ready()["workers"]
    named = request("who serves this now?", 4)
    named.model = "demo-moe"
    for victim in victims:
        os.kill(victim["pid"], signal.SIGSTOP)
    try:
        wait_until(lambda: "demo-moe" not in listed_models(mesh), RECOVERY_BOUND, "the gateway lists the model no more")
        with pytest.raises(grpc.RpcError) as caught:
            generate(mesh.gateway, named)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
        assert caught.value.details() == "model 'demo-moe' has no ready replica at the moment; retry"
        typo = request("and this?", 4)
        typo.model = "demo-mow"
        with pytest.raises(grpc.RpcError) as caught:
            generate(mesh.gateway, typo)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, "nothing is served: even a typo may be a model to come"
    finally:
        for victim in victims:
            os.kill(victim["pid"], signal.SIGCONT)
    wait_until(lambda: whole(mesh), RECOVERY_BOUND, "the resumed workers re-register")
    wait_until(lambda: "demo-moe" in listed_models(mesh), RECOVERY_BOUND, "the gateway lists the model again")
    assert generate(mesh.gateway, named)["finish"] == common_pb2.FINISH_REASON_LENGTH


# ---- scheduler and gateway -------------------------------------------------------------------------------------------
def test_a_scheduler_killed_under_load_ends_streams_retryably_and_heals_on_the_same_address(healthy, reference):
    mesh = healthy
    victim = mesh.ready["scheduler"]
    load = Load(mesh.gateway, streams())
    load.assert_running()
    os.kill(victim["pid"], signal.SIGKILL)
    killed = time.monotonic()
    outcomes = load.results()
    for i, outcome in enumerate(outcomes):
        if not isinstance(outcome, dict):
            assert outcome == grpc.StatusCode.UNAVAILABLE, f"stream {i} must end retryably, not with {outcome}"
        else:
            assert_identical([outcome], [reference[i]], "a stream that outlived the scheduler")
    assert grpc.StatusCode.UNAVAILABLE in outcomes, "streams in flight through the killed scheduler are cut"
    assert time.monotonic() - killed < 15, "the cut streams must end at once, not at their deadline"

    answer = wait_until(lambda: generate(mesh.gateway, stream(0), timeout=10), RECOVERY_BOUND,
                        "a new request succeeds after the scheduler's restart")
    assert answer["ids"] == reference[0]["ids"]
    back = mesh.read_ready()["scheduler"]
    assert back["address"] == victim["address"] and back["pid"] != victim["pid"], "restarted on its address"
    assert back["restarts"] == victim["restarts"] + 1
    wait_until(lambda: ready_workers(mesh) == set(mesh.workers), RECOVERY_BOUND, "both workers re-register")


def test_a_killed_gateway_is_restarted_on_the_same_port(healthy, reference):
    mesh = healthy
    victim = mesh.ready["gateway"]
    os.kill(victim["pid"], signal.SIGKILL)
    answer = wait_until(lambda: generate(mesh.gateway, stream(1), timeout=10), RECOVERY_BOUND,
                        "the gateway answers again on its address")
    assert answer["ids"] == reference[1]["ids"]
    back = mesh.read_ready()["gateway"]
    assert back["address"] == victim["address"] and back["pid"] != victim["pid"]


# ---- Redis -----------------------------------------------------------------------------------------------------------
def test_redis_paused_under_load_costs_no_request_and_the_caches_come_back(healthy, reference):
    mesh = healthy
    short = MAX_TOKENS - 8  # keys of their own in the response cache, and still the reference's first tokens
    load = Load(mesh.gateway, streams(short, cached=True))
    load.assert_running()
    redis_client(mesh).execute_command("CLIENT", "PAUSE", 4000, "ALL")  # every other client waits 4 s for an answer
    paused = time.monotonic()
    during = generate(mesh.gateway, request("a prompt sent while Redis is paused", 8, cached=True), timeout=30)
    outcomes = load.results()
    assert time.monotonic() - paused < 30, "a paused Redis must cost a short timeout per call, not the pause"
    assert during["finish"] == common_pb2.FINISH_REASON_LENGTH and len(during["ids"]) == 8 and not during["cached"]
    for i, got in enumerate(outcomes):
        assert isinstance(got, dict) and got["ids"] == reference[i]["ids"][:short], \
            f"stream {i} under a paused Redis: {got if not isinstance(got, dict) else 'tokens differ'}"
    wait_until(caches_work(mesh.gateway, "after pause"), RECOVERY_BOUND, "the response cache serves hits again")


def test_redis_killed_under_load_costs_no_request_and_is_restarted_with_working_caches(healthy, reference):
    mesh = healthy
    victim = mesh.ready["redis"]
    load = Load(mesh.gateway, streams(cached=True))
    load.assert_running()
    os.kill(victim["pid"], signal.SIGKILL)
    assert_identical(load.results(), reference, "Redis kill -9")
    assert mesh.process.poll() is None, "losing Redis must not stop the mesh"
    back = restarted(mesh, lambda ready: ready["redis"], victim["pid"])
    assert back["url"] == victim["url"] and back["restarts"] == victim["restarts"] + 1, "the same Redis address"
    client = redis_client(mesh)
    wait_until(caches_work(mesh.gateway, "after kill"), RECOVERY_BOUND, "the gateway's caches work again")
    wait_until(kv_tier_works(mesh.gateway, client, "kill"), RECOVERY_BOUND, "the workers' KV tier works again")


# ---- the services alone, no supervisor -------------------------------------------------------------------------------
@pytest.mark.slow  # starts its own three services
def test_services_without_a_supervisor_survive_a_redis_stop_and_use_it_again_on_its_return(tmp_path, monkeypatch):
    server = RedisServer()
    monkeypatch.setenv("MOEMESH_GATEWAY_REDIS_URL", server.url)
    monkeypatch.setenv("MOEMESH_WORKER_KV_TIER_URL", server.url)
    services = []
    try:
        scheduler = Service("moemesh.services.scheduler.main", "--port", "0", log=tmp_path / "scheduler.log")
        services.append(scheduler)
        address = scheduler.info["address"]
        services.append(Service("moemesh.worker.server.main", "--port", "0", "--scheduler", address,
                                "--model-dir", str(DEMO_MODEL), "--max-num-seqs", "16", log=tmp_path / "worker.log"))
        gateway = Service("moemesh.gateway.main", "--port", "0", "--scheduler", address, log=tmp_path / "gateway.log")
        services.append(gateway)
        target = gateway.info["address"]
        prompts = PROMPTS[:8]
        reference = Load(target, [request(p) for p in prompts]).results()
        load = Load(target, [request(p, cached=True) for p in prompts])
        load.assert_running()
        server.stop()
        assert_identical(load.results(), reference, "Redis stopped")
        assert_identical(Load(target, [request(p, cached=True) for p in prompts]).results(), reference,
                         "requests while Redis is down")
        server.start()  # the same port
        wait_until(caches_work(target, "standalone"), RECOVERY_BOUND, "the gateway's caches work again")
        client = redis.Redis.from_url(server.url, socket_timeout=1)
        wait_until(kv_tier_works(target, client, "standalone"), RECOVERY_BOUND, "the worker's KV tier works again")
    finally:
        for service in reversed(services):
            service.stop()
        server.stop()


# ---- the restart policy, on plain processes --------------------------------------------------------------------------
# A stand-in service: announces an address on its ready pipe (the fd is the last argument) and closes it, as the
# services do, then serves for a minute.
ANNOUNCE = ("import os, sys, time; fd = int(sys.argv[-1]); os.write(fd, b'{\"address\": \"127.0.0.1:1\"}\\n'); "
            "os.close(fd); time.sleep(60)")


def stand_in_mesh(tmp_path, argv: list[str], policy: RestartPolicy, published: list) -> tuple[Mesh, Child]:
    mesh = Mesh(MeshOptions(model_dir=tmp_path, log_dir=tmp_path / "logs"), policy=policy, publish=published.append)
    return mesh, mesh._add(Child("worker-0", lambda: argv))


async def test_a_child_that_dies_is_restarted_after_the_backoff_and_the_ready_document_follows(tmp_path):
    published: list[dict] = []
    mesh, child = stand_in_mesh(tmp_path, [sys.executable, "-c", ANNOUNCE, "--"], RestartPolicy(first_delay=0.2),
                                published)
    await mesh._launch(child)
    supervising = asyncio.create_task(mesh.supervise())
    try:
        first = child.process.pid
        os.kill(first, signal.SIGKILL)
        killed = time.monotonic()
        while not published:
            await asyncio.sleep(0.02)
        assert time.monotonic() - killed >= 0.2, "the restart waits for its backoff"
        (ready,) = published
        assert ready["workers"][0]["pid"] == child.process.pid != first and ready["workers"][0]["restarts"] == 1
        assert "--- moemesh: restart 1" in (tmp_path / "logs" / "worker-0.log").read_text()
    finally:
        supervising.cancel()
        await asyncio.gather(supervising, return_exceptions=True)
        await mesh.stop()


async def test_a_child_in_a_crash_loop_stops_the_supervisor_naming_it_and_its_log(tmp_path):
    policy = RestartPolicy(first_delay=0.01, crash_loop_exits=5, crash_loop_window=60)
    mesh, child = stand_in_mesh(tmp_path, [sys.executable, "-c", ANNOUNCE, "--"], policy, [])
    await mesh._launch(child)
    child.argv = lambda: [sys.executable, "-c", "raise SystemExit(3)"]  # from now on it dies at once
    os.kill(child.process.pid, signal.SIGKILL)
    with pytest.raises(CrashLoop) as caught:
        await asyncio.wait_for(mesh.supervise(), 30)
    message = str(caught.value)
    assert "worker-0 exited 5 times" in message and "code 3" in message, message
    assert str(tmp_path / "logs" / "worker-0.log") in message, message
    assert child.restarts == 4
    await mesh.stop()


# ---- last: it ends the shared mesh -----------------------------------------------------------------------------------
def test_redis_in_a_crash_loop_stops_the_mesh_with_a_message_naming_it_and_its_log(healthy):
    mesh = healthy
    pids = mesh.service_pids()
    killed: set[int] = set()

    def next_redis() -> int | str | None:
        if mesh.process.poll() is not None:
            return "stopped"
        pid = mesh.read_ready()["redis"]["pid"]
        return pid if pid not in killed and pid_alive(pid) else None

    while (pid := wait_until(next_redis, RECOVERY_BOUND, "Redis restarted, or the supervisor gave up")) != "stopped":
        assert len(killed) < 5, "the fifth exit within a minute must stop the mesh"
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
    assert mesh.process.wait(RECOVERY_BOUND) == 1, "a crash loop ends `moemesh up` with status 1"
    output = mesh.process.communicate()[0]
    assert "redis exited 5 times within 60 s" in output and str(mesh.log_dir / "redis.log") in output, output
    assert "exited (signal SIGKILL); restart 1 in 0.5 s" in output, "each restart is logged with its delay"
    assert not [p for p in pids if pid_alive(p)], "the mesh stops whole"


def processes_with_token(token: str) -> list[int]:
    """Pids of the processes whose environment holds this run's cluster token (every service of one mesh)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as environ:
                    if token.encode() in environ.read():
                        found.append(int(entry))
            except OSError:
                continue  # gone, or not ours
    return found


def test_a_gateway_that_cannot_start_stops_the_workers_starting_beside_it(tmp_path):
    """The gateway starts while the workers load: when it fails, `moemesh up` stops at once, whole."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()  # the gateway's port, taken
    token = "gateway-start-" + os.urandom(8).hex()
    started = time.monotonic()
    try:
        process = subprocess.run(
            [sys.executable, "-m", "moemesh.cli", "up", "--port", str(held.getsockname()[1]), "--no-http",
             "--no-embeddings", "--model", str(DEMO_MODEL), "--log-dir", str(tmp_path / "logs")],
            env={**os.environ, "MOEMESH_CLUSTER_TOKEN": token}, capture_output=True, text=True, timeout=RECOVERY_BOUND)
    finally:
        held.close()
    assert process.returncode == 1, process.stderr
    assert "gateway did not become ready" in process.stderr and "gateway.log" in process.stderr, process.stderr
    assert "worker-0" not in process.stderr, "the worker's start was cancelled, not reported as its failure"
    assert time.monotonic() - started < RECOVERY_BOUND
    assert not [p for p in processes_with_token(token) if pid_alive(p)], "no service outlives the failed start"
