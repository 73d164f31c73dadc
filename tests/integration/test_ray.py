"""The mesh on Ray (`moemesh.ray_mesh`), against a local Ray instance on loopback started by this module.

Two single-process replicas of a tiny checkpoint (with the embedding model,
as `moemesh up` serves it) are placed by Ray, each in its own placement
group; a generation and an embedding go through the gateway; removing one
replica's actor while greedy streams are in flight fails them over to the
other with exactly the tokens of a clean run; a service that exits is
restarted by Ray in its bundle, on the address it had. A replica of two ranks
(an expert shard beside rank 0) gets a placement group of two bundles and
generates the single-process replicas' tokens.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from moemesh.v1 import (
    common_pb2,
    embeddings_pb2,
    embeddings_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from tests.support.checkpoints import build_tiny_mixtral
from tests.support.mesh import live, pid_alive

# Ray resolves 127.0.0.1 to the machine's outward address on Linux; this, read when ray is first imported, keeps the
# whole instance (and so every service the actors start) on loopback, as Ray does on a laptop.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

from moemesh.ray_mesh import RayMesh, start_mesh_on_ray  # noqa: E402  (needs ray, checked above)

pytestmark = pytest.mark.slow

PROMPTS = [f"The scheduler admits request {i} and" for i in range(8)]
MAX_TOKENS = 800  # long enough that the streams are still running when the replica is removed (400 took 0.5 s)
STREAM_DEADLINE = 90.0
RECOVERY_BOUND = 60.0  # seconds Ray may take to restart an actor and its service on this loaded 2-core machine


# ---- requests --------------------------------------------------------------------------------------------------------
def request(prompt: str) -> generation_pb2.GenerateRequest:
    """A greedy request of exactly MAX_TOKENS that really runs (never answered from the response cache)."""
    return generation_pb2.GenerateRequest(
        prompt=common_pb2.Prompt(text=prompt), cache_mode=common_pb2.CACHE_MODE_NO_STORE,
        sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))


def collect(events) -> dict:
    out = {"ids": [], "text": "", "finish": None}
    for event in events:
        out["ids"] += event.token_ids
        out["text"] += event.text
        if event.finish_reason:
            out["finish"] = event.finish_reason
    return out


def run_streams(gateway: str, on_first_events=None) -> list:
    """All PROMPTS streamed at once; `on_first_events()` runs once each has sent its first event."""
    with grpc.insecure_channel(gateway) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        calls = [stub.Generate(request(p), timeout=STREAM_DEADLINE) for p in PROMPTS]
        firsts = [next(call) for call in calls]
        if on_first_events is not None:
            on_first_events()
        outcomes = []
        for first, call in zip(firsts, calls):
            try:
                outcomes.append(collect([first, *call]))
            except grpc.RpcError as exc:
                outcomes.append(exc.code())
        return outcomes


def nodes(mesh: RayMesh) -> list:
    metadata = (("authorization", f"Bearer {mesh.credentials.cluster_token}"),)
    with grpc.insecure_channel(mesh.scheduler) as channel:
        return scheduler_pb2_grpc.SchedulerStub(channel).ListNodes(scheduler_pb2.ListNodesRequest(), timeout=5,
                                                                   metadata=metadata).nodes


def wait_until(probe, timeout: float, what: str):
    """`probe()`'s first truthy answer within `timeout` seconds (a process outside the test gives no event)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = probe()
        except grpc.RpcError:
            answer = None
        if answer:
            return answer
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.2)


# ---- the cluster and the mesh ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance on loopback, light enough for a 2-core machine; shut down after the module."""
    for attempt in (1, 2):
        try:
            # Logical CPUs (what bundles reserve), enough for both meshes of this module: not the machine's two cores.
            ray.init(address="local", num_cpus=8, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1",
                     object_store_memory=80 * 1024 * 1024, logging_level="WARNING", log_to_driver=False)
            break
        except Exception as exc:  # Ray raises a bare Exception when its raylet never registers
            # Seen once in a CI run: the raylet left no log and never came up (a port taken at its start?). That is
            # Ray's start-up, not the mesh's: start it once more before failing the module.
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
            ray.shutdown()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_mixtral(tmp_path_factory.mktemp("tiny"), max_position_embeddings=1024)


@pytest.fixture(scope="module")
def mesh(cluster, checkpoint, tmp_path_factory):
    from moemesh.worker.embeddings.sentence import default_embedding_model_dir

    settings = {"MOEMESH_SCHEDULER_AFFINITY_LOAD_GUARD": "0",  # load alone decides: streams spread over both
                "MOEMESH_SCHEDULER_HEARTBEAT_INTERVAL": "0.5"}
    placed = start_mesh_on_ray(checkpoint, workers=2, embedding_model_dir=default_embedding_model_dir(), port=0,
                               http_port=None, log_dir=tmp_path_factory.mktemp("ray-logs"), env=settings)
    yield placed
    placed.stop()


@pytest.fixture(scope="module")
def reference(mesh) -> list[dict]:
    """The greedy answers of the clean mesh, both replicas serving."""
    answers = run_streams(mesh.gateway)
    assert all(isinstance(a, dict) and len(a["ids"]) == MAX_TOKENS for a in answers), answers
    return answers


# ---- tests -----------------------------------------------------------------------------------------------------------
def test_ray_places_each_replica_in_its_own_placement_group_and_the_workers_register(mesh):
    groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    replicas = [g for g in groups if len(g["bundles"]) == 1]  # one bundle per rank: single-process replicas
    assert len(replicas) == 2 and all(g["strategy"] == "PACK" for g in replicas), groups
    assert all(b == {"CPU": 1.0} for g in replicas for b in g["bundles"].values()), "no GPU here: CPU bundles only"
    wait_until(lambda: {n.address for n in nodes(mesh) if n.state == "ready"} == set(mesh.workers), 10,
               "the workers Ray placed register like any other")
    assert all(w["node_ip"] == "127.0.0.1" and pid_alive(w["pid"]) for w in mesh.ready["workers"])
    services = [mesh.ready["gateway"], mesh.ready["scheduler"], *mesh.ready["workers"]]
    assert all(s.get("metrics_address") for s in services), "metrics are on, as under moemesh up"


def test_a_replica_placed_by_ray_serves_a_generation_and_an_embedding_through_the_gateway(mesh):
    with grpc.insecure_channel(mesh.gateway) as channel:
        answer = collect(generation_pb2_grpc.GenerationStub(channel).Generate(request(PROMPTS[0]), timeout=60))
        reply = embeddings_pb2_grpc.EmbeddingsStub(channel).Embed(
            embeddings_pb2.EmbedRequest(inputs=["invoice overdue"]), timeout=60)
    assert answer["finish"] == common_pb2.FINISH_REASON_LENGTH and len(answer["ids"]) == MAX_TOKENS
    assert reply.dimensions == 384 and len(reply.embeddings[0].values) == 384


def test_removing_a_replicas_actor_fails_its_streams_over_with_the_tokens_of_a_clean_run(mesh, reference):
    removed = []

    def remove_victim():
        # The victim is whichever replica holds the most streams: on a loaded host a late heartbeat can leave one
        # replica unroutable for a moment, and the router then gives the other all of them.
        held = {n.address: n.in_flight for n in nodes(mesh)}
        address = max(held, key=held.get)
        assert held[address] > 0, f"the victim must hold running streams: {held}"
        index = mesh.workers.index(address)
        assert mesh.describe(f"worker-{index}")["address"] == address
        removed.append(mesh.ready["workers"][index])
        ray.kill(mesh.actors[f"worker-{index}"])

    outcomes = run_streams(mesh.gateway, remove_victim)
    for i, (got, want) in enumerate(zip(outcomes, reference, strict=True)):
        assert isinstance(got, dict), f"stream {i} failed with {got} instead of failing over"
        assert got["finish"] == common_pb2.FINISH_REASON_LENGTH, f"stream {i} did not complete"
        assert got["ids"] == want["ids"], f"stream {i} lost, repeated or changed tokens"
    (victim,) = removed
    wait_until(lambda: not pid_alive(victim["pid"]), 5, "the removed actor's worker process dies with it")
    survivors = set(mesh.workers) - {victim["address"]}
    wait_until(lambda: {n.address for n in nodes(mesh) if n.state == "ready"} == survivors, 10,
               "only the other replica is left serving")


def test_a_service_that_exits_is_restarted_by_ray_in_its_bundle_on_the_address_it_had(mesh, reference):
    serving = {n.address for n in nodes(mesh) if live(n.state)}
    before = mesh.describe("scheduler")
    os.kill(before["pid"], signal.SIGKILL)
    after = wait_until(lambda: _restarted(mesh, "scheduler", before["pid"]), RECOVERY_BOUND,
                       "Ray restarts the scheduler's actor")
    assert after["address"] == before["address"] and after["restarts"] == before["restarts"] + 1
    wait_until(lambda: {n.address for n in nodes(mesh) if n.state == "ready"} == serving, RECOVERY_BOUND,
               "the workers register again with the restarted scheduler")

    def generation():  # the gateway's channel to the scheduler reconnects by itself: UNAVAILABLE until then
        with grpc.insecure_channel(mesh.gateway) as channel:
            return collect(generation_pb2_grpc.GenerationStub(channel).Generate(request(PROMPTS[1]), timeout=60))

    answer = wait_until(generation, RECOVERY_BOUND, "a new request through the gateway succeeds")
    assert answer["ids"] == reference[1]["ids"], "the healed mesh serves the same greedy answer"


# ---- an expert-parallel replica --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ep_mesh(cluster, checkpoint, tmp_path_factory):
    """One replica of two ranks (rank 0 and an expert shard) on the same cluster, without embeddings."""
    placed = start_mesh_on_ray(checkpoint, workers=1, ep_size=2, port=0, http_port=None,
                               log_dir=tmp_path_factory.mktemp("ray-ep-logs"),
                               env={"MOEMESH_SCHEDULER_HEARTBEAT_INTERVAL": "0.5"})
    yield placed
    placed.stop()


def test_an_expert_parallel_replica_is_placed_rank_by_rank_and_serves_the_single_process_tokens(ep_mesh, reference):
    groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    assert [len(g["bundles"]) for g in groups].count(2) == 1, f"one placement group of two bundles: {groups}"
    (shard,) = ep_mesh.ready["shards"]
    (worker,) = ep_mesh.ready["workers"]
    registered = {n.address: n for n in nodes(ep_mesh)}
    leader, member = registered[worker["address"]], registered[shard["address"]]
    assert (leader.rank, member.rank) == (0, 1) and leader.world_size == member.world_size == 2
    assert leader.replica_group == member.replica_group
    wait_until(lambda: {n.address: n for n in nodes(ep_mesh)}[worker["address"]].routable, 10,
               "both ranks registered: routable (a late heartbeat can leave it unroutable for a moment)")
    with grpc.insecure_channel(ep_mesh.gateway) as channel:
        answer = collect(generation_pb2_grpc.GenerationStub(channel).Generate(request(PROMPTS[2]), timeout=120))
    assert answer["finish"] == common_pb2.FINISH_REASON_LENGTH
    assert answer["ids"] == reference[2]["ids"], "the two-rank replica generates the single-process replicas' tokens"


def _restarted(mesh: RayMesh, name: str, old_pid: int) -> dict | None:
    try:
        now = mesh.describe(name, timeout=5)
    except ray.exceptions.RayError:  # the actor is being restarted
        return None
    return now if now["pid"] != old_pid and now["alive"] else None
