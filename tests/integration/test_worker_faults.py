"""No request can take down a worker; an engine failure fails its requests over; no head-of-line blocking.

Real processes started as the supervisor starts them (a scheduler, workers, a whole `moemesh up` mesh), a
tiny Mixtral checkpoint whose chat template raises for non-alternating roles, gRPC on loopback.

Engine failures are injected from outside the product: each test process gets a `sitecustomize.py`
(written here, put on its PYTHONPATH) under which the engine of the worker whose pid names a file in the
faults directory raises in its next step, as a device fault would. No production code knows about it.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.local import start_mesh, stop_mesh
from moemesh.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    models_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.support.checkpoints import build_tiny_mixtral
from tests.support.mesh import Service, pid_alive

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
EXIT_ENGINE_FAILED = 70
KV_BLOCKS, BLOCK_SIZE = 64, 16  # the module's worker: a pool of 1,024 tokens, the longest sequence it holds

SITECUSTOMIZE = '''
"""Test-only fault injection (see tests/integration/test_worker_faults.py)."""
import os
import sys

_FAULTS = os.environ.get("MOEMESH_TEST_FAULTS_DIR")
if _FAULTS and "moemesh.worker.server.main" in sys.orig_argv:
    from moemesh.worker.engine import engine as _engine

    _step = _engine.Engine.step

    def _faulty_step(self):
        mine = os.path.join(_FAULTS, f"fail-{os.getpid()}")
        if any(seq.num_generated >= 8 for seq in self.running):  # mid-stream: a trigger turns into a failure
            for trigger in (mine + "-mid-stream", os.path.join(_FAULTS, "fail-first-mid-stream")):
                try:
                    os.rename(trigger, mine)  # atomic: one worker claims "fail-first-mid-stream"
                except FileNotFoundError:
                    pass  # not set, or another worker claimed it first
        if os.path.exists(mine):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected by the test)")
        return _step(self)

    _engine.Engine.step = _faulty_step
'''


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """The faults directory, on the PYTHONPATH (with its sitecustomize) of every process started in this module."""
    directory = tmp_path_factory.mktemp("faults")
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "MOEMESH_TEST_FAULTS_DIR")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(directory), saved["PYTHONPATH"]) if p)
    os.environ["MOEMESH_TEST_FAULTS_DIR"] = str(directory)
    yield directory
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def fail_engine_mid_stream(faults, pid: int) -> None:
    """Process `pid`'s engine fails at its first step with a stream 8 tokens into its output (whenever that is)."""
    (faults / f"fail-{pid}-mid-stream").touch()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_mixtral(tmp_path_factory.mktemp("tiny"), max_position_embeddings=2048)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory, faults):
    logs = tmp_path_factory.mktemp("logs")
    # Frequent heartbeats (the load the tests wait for arrives fast), but a worker is evicted only after 5 s of
    # silence: on a loaded host 0.6 s (3 missed) can pass without a beat, and the module's only worker must stay.
    service = Service("moemesh.services.scheduler.main", "--port", "0", "--heartbeat-interval", "0.2",
                      log=logs / "scheduler.log", env={"MOEMESH_SCHEDULER_MAX_MISSED_HEARTBEATS": "25"})
    yield service.info["address"]
    service.stop()


def start_worker(checkpoint, scheduler: str, log, node_id: str) -> Service:
    return Service("moemesh.worker.server.main", "--model-dir", str(checkpoint), "--scheduler", scheduler,
                   "--port", "0", "--node-id", node_id, "--max-num-seqs", "4", "--num-kv-blocks", str(KV_BLOCKS),
                   "--block-size", str(BLOCK_SIZE), "--no-pooled-embeddings", "--num-threads", "1",
                   "--drain-grace", "0", log=log)


@pytest.fixture(scope="module")
def worker(checkpoint, scheduler, tmp_path_factory):
    service = start_worker(checkpoint, scheduler, tmp_path_factory.mktemp("logs") / "worker.log", "steady")
    yield service
    service.stop()


@pytest.fixture(scope="module")
def vocab_size(checkpoint) -> int:
    return json.loads((checkpoint / "config.json").read_text())["vocab_size"]


# ---- helpers -----------------------------------------------------------------------------------------------------------

def work(request_id: str, *, text: str = "", token_ids=(), max_tokens: int = 8, resume=(), priority: int = 0,
         chat: list[tuple[str, str]] | None = None) -> worker_pb2.GenerationWork:
    w = worker_pb2.GenerationWork(request_id=request_id, priority=priority,
                                  sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                     ignore_eos=True))
    w.prompt_token_ids.extend(token_ids)
    w.resume_token_ids.extend(resume)
    if chat is not None:
        for role, content in chat:
            w.prompt.chat.messages.add(role=role, content=content)
    elif text:
        w.prompt.text = text
    return w


class Stream:
    """One bidirectional stream (the scheduler's Dispatch or a worker's Execute) driven from a thread: send work,
    read each request's events in arrival order."""

    def __init__(self, call_factory, model: str = "") -> None:
        self.model = model
        self._requests: queue.Queue = queue.Queue()
        self.events: queue.Queue = queue.Queue()
        self.call = call_factory(iter(self._requests.get, None))
        self.results: dict[str, dict] = {}
        self.finished_order: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def send(self, *works: worker_pb2.GenerationWork) -> None:
        for w in works:
            w.model = w.model or self.model
            self.results[w.request_id] = {"ids": [], "error": None, "finish": 0}
            self._requests.put(worker_pb2.ExecuteRequest(add=w))

    def _read(self) -> None:
        try:
            for batch in self.call:
                for event in batch.events:
                    self.events.put(event)
        except grpc.RpcError as exc:
            self.events.put(exc)
        self.events.put(None)

    def until(self, done, timeout: float = 60.0) -> None:
        """Read events until `done()` holds; fail (naming what is missing) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not done():
            try:
                event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no answer within {timeout} s; so far: {self.results}") from None
            if event is None or isinstance(event, grpc.RpcError):
                raise AssertionError(f"the stream ended ({event}); so far: {self.results}")
            result = self.results[event.request_id]
            result["ids"] += event.token_ids
            if event.HasField("error"):
                result["error"] = (event.error.code, event.error.message)
            result["finish"] = event.finish_reason or result["finish"]
            if event.HasField("error") or event.finish_reason:
                self.finished_order.append(event.request_id)

    def ended(self, *request_ids: str) -> bool:
        return all(self.results[r]["error"] or self.results[r]["finish"] for r in request_ids)

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()


def dispatch(channel: grpc.Channel, model: str) -> Stream:
    return Stream(scheduler_pb2_grpc.SchedulerStub(channel).Dispatch, model)


def model_info(channel: grpc.Channel):
    return scheduler_pb2_grpc.SchedulerStub(channel).ListModels(models_pb2.ListModelsRequest(), timeout=10).models[0]


def nodes(channel: grpc.Channel, metadata=()) -> list:
    stub = scheduler_pb2_grpc.SchedulerStub(channel)
    return list(stub.ListNodes(scheduler_pb2.ListNodesRequest(), timeout=10, metadata=metadata).nodes)


def steady(channel: grpc.Channel):
    return next(n for n in nodes(channel) if n.node_id == "steady")


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.02)


class HealthProbe:
    """Watches gRPC health (readiness) on a stream, as an orchestrator or the scheduler would."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.stub = health_pb2_grpc.HealthStub(channel)
        self.answers: list[str] = []
        self._call = None
        self._thread = threading.Thread(target=self._read, daemon=True)

    def check(self) -> str:
        try:
            reply = self.stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        except grpc.RpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def _read(self) -> None:
        try:
            for reply in self._call:
                self.answers.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        except grpc.RpcError as exc:  # the server went away: the stream ends with its status
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.answers.append(exc.code().name)

    def start(self) -> None:
        """Open the watch and take its first answer (the status now) before returning."""
        self._call = self.stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        self.answers.append(health_pb2.HealthCheckResponse.ServingStatus.Name(next(self._call).status))
        self._thread.start()

    def stop(self) -> list[str]:
        """The answers in the order they came."""
        self._thread.join(timeout=10)
        self._call.cancel()
        return self.answers


@pytest.fixture(scope="module")
def channel(scheduler, worker):
    with grpc.insecure_channel(scheduler) as ch:
        wait_for(lambda: any(n.node_id == "steady" for n in nodes(ch)), 30, "the worker registers")
        yield ch


# ---- a request's failure is that request's error --------------------------------------------------------------------

def test_a_lone_assistant_message_is_invalid_argument_and_the_next_request_on_the_stream_succeeds(channel):
    stream = dispatch(channel, model_info(channel).id)
    try:
        stream.send(work("lone", chat=[("assistant", "I speak first")]))
        stream.until(lambda: stream.ended("lone"), timeout=30)
        code, message = stream.results["lone"]["error"]
        assert code == INVALID_ARGUMENT and message.startswith("prompt: "), message
        assert "alternate" in message, "the template's own reason is passed on"
        stream.send(work("after", chat=[("user", "Hello there")], max_tokens=6))
        stream.until(lambda: stream.ended("after"), timeout=30)
        assert stream.results["after"]["finish"] == common_pb2.FINISH_REASON_LENGTH
        assert len(stream.results["after"]["ids"]) == 6
    finally:
        stream.close()


def test_token_ids_outside_the_vocabulary_are_invalid_argument_naming_the_field_and_the_worker_serves_on(
        channel, vocab_size):
    stream = dispatch(channel, model_info(channel).id)
    try:
        stream.send(work("over", token_ids=[1, 5, vocab_size + 7]),
                    work("negative", token_ids=[1, -3, 9]),
                    work("resume", token_ids=[1, 5, 9], resume=[11, vocab_size]))
        stream.until(lambda: stream.ended("over", "negative", "resume"), timeout=30)
        for request_id, field, bad in [("over", "prompt_token_ids", vocab_size + 7), ("negative", "prompt_token_ids", -3),
                                       ("resume", "resume_token_ids", vocab_size)]:
            code, message = stream.results[request_id]["error"]
            assert code == INVALID_ARGUMENT, f"{request_id}: {code} {message}"
            assert message.startswith(f"{field}: token id {bad} ") and str(vocab_size) in message, message
        stream.send(work("good", token_ids=[1, 5, 9, vocab_size - 1], max_tokens=5))
        stream.until(lambda: stream.ended("good"), timeout=30)
        assert stream.results["good"]["finish"] == common_pb2.FINISH_REASON_LENGTH
        assert len(stream.results["good"]["ids"]) == 5, "the worker still serves"
    finally:
        stream.close()


# ---- head-of-line blocking ------------------------------------------------------------------------------------------------

def test_a_big_request_that_cannot_fit_yet_does_not_block_small_ones_and_a_never_fitting_one_is_refused(channel):
    info = model_info(channel)
    context = info.max_context_tokens
    assert context == KV_BLOCKS * BLOCK_SIZE, "the pool is the limit (the model's context is 2,048)"
    stream = dispatch(channel, info.id)
    try:
        stream.send(work("hog", token_ids=[5 + i % 200 for i in range(300)], max_tokens=600))  # 19 blocks, to 57
        stream.until(lambda: stream.results["hog"]["ids"], timeout=30)
        # Wait until the scheduler has heard (by heartbeat) that the hog holds its blocks.
        wait_for(lambda: steady(channel).load.free_kv_blocks <= KV_BLOCKS - 19, 10, "a heartbeat reports the hog")

        started = time.monotonic()
        stream.send(work("never", token_ids=[7] * 800, max_tokens=300, priority=9))
        stream.until(lambda: stream.ended("never"), timeout=5)
        assert time.monotonic() - started < 2.0, "refused at once, not after a wait"
        code, message = stream.results["never"]["error"]
        assert code == INVALID_ARGUMENT and message.startswith("max_tokens: prompt 800 + max_tokens 300 = 1100 tokens")
        assert str(context) in message, "the message gives the limit"

        stream.send(work("big", token_ids=[9 + i % 100 for i in range(700)], max_tokens=50, priority=5))  # 47 blocks
        stream.send(*[work(f"small{i}", token_ids=[20 + i, 21, 22], max_tokens=4) for i in range(3)])
        smalls = [f"small{i}" for i in range(3)]
        stream.until(lambda: stream.ended("hog", "big", *smalls), timeout=60)
        order = stream.finished_order
        assert all(order.index(s) < order.index("hog") for s in smalls), f"the smalls waited behind the big one: {order}"
        assert stream.results["big"]["finish"] == common_pb2.FINISH_REASON_LENGTH, "the big one ran once there was room"
        assert len(stream.results["big"]["ids"]) == 50
    finally:
        stream.close()


# ---- an engine failure ----------------------------------------------------------------------------------------------------

def test_an_engine_failure_fails_in_flight_requests_with_unavailable_reports_unhealthy_and_exits_non_zero(
        checkpoint, scheduler, faults, tmp_path, vocab_size):
    victim = start_worker(checkpoint, scheduler, tmp_path / "victim.log", "victim")
    try:
        with grpc.insecure_channel(victim.info["address"]) as ch, grpc.insecure_channel(scheduler) as sched:
            wait_for(lambda: any(n.node_id == "victim" for n in nodes(sched)), 30, "the victim registers")
            health = HealthProbe(ch)
            assert health.check() == "SERVING"

            health.start()
            fail_engine_mid_stream(faults, victim.info["pid"])  # set first: it fires mid-stream on any host
            stream = Stream(worker_pb2_grpc.WorkerStub(ch).Execute)  # as the scheduler's link would
            stream.send(*[work(f"r{i}", token_ids=[1, 5 + i, 9], max_tokens=200) for i in range(2)])
            stream.until(lambda: stream.ended("r0", "r1"), timeout=60)
            assert any(stream.results[f"r{i}"]["ids"] for i in range(2)), "the failure hit streams under way"
            for request_id in ("r0", "r1"):
                code, message = stream.results[request_id]["error"]
                assert code == UNAVAILABLE and "engine" in message, f"{request_id}: {code} {message}"
                assert not stream.results[request_id]["finish"]

            assert victim.process.wait(timeout=30) == EXIT_ENGINE_FAILED
            answers = health.stop()
            assert answers[:2] == ["SERVING", "NOT_SERVING"], f"the watcher must be told NOT_SERVING: {answers}"
            assert set(answers) <= {"SERVING", "NOT_SERVING", "UNAVAILABLE"}
            assert "SERVING" not in answers[answers.index(next(a for a in answers if a != "SERVING")):], answers
            assert not any(n.node_id == "victim" for n in nodes(sched)), "it left the scheduler's registry"
    finally:
        victim.stop()
    assert "engine loop failed" in (tmp_path / "victim.log").read_text(), "the failure is logged"


@pytest.mark.slow
def test_a_worker_whose_engine_fails_mid_stream_hands_its_streams_to_the_other_replica(tmp_path, faults, monkeypatch):
    monkeypatch.setenv("MOEMESH_SCHEDULER_AFFINITY_LOAD_GUARD", "0")  # spread the streams over both workers
    mesh = start_mesh(tmp_path, "--workers", "2", "--no-embeddings", "--no-http")
    # While it exists, the first worker to step with a stream 8 tokens in fails from then on (its `fail-<pid>`
    # appears); the other serves on.
    trigger = faults / "fail-first-mid-stream"
    try:
        requests = [generation_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(text=f"def handler_{i}(request):\n    "),
            sampling=common_pb2.SamplingParams(max_tokens=120, ignore_eos=True, temperature=0.0),
            cache_mode=common_pb2.CACHE_MODE_NO_STORE) for i in range(6)]
        with grpc.insecure_channel(mesh.gateway) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            undisturbed = [stub.Generate(r, timeout=120) for r in requests]  # all at once, as the disturbed run
            clean = [[t for e in call for t in e.token_ids] for call in undisturbed]
            # Whichever worker first runs a stream 8 tokens in fails then, mid-stream (the router may give one
            # worker all six; waiting here to choose one could let its streams finish first on a slow host).
            trigger.touch()
            calls = [stub.Generate(r, timeout=120) for r in requests]
            disturbed = [[t for e in call for t in e.token_ids] for call in calls]
        for i, (before, after) in enumerate(zip(clean, disturbed)):
            assert after == before, f"stream {i}: tokens lost, repeated or changed by the failover"
        failed = [w["pid"] for w in mesh.ready["workers"] if (faults / f"fail-{w['pid']}").exists()]
        assert len(failed) == 1, "one worker's engine failed mid-stream"
        wait_for(lambda: not pid_alive(failed[0]), 30, "the failed worker exits")
    finally:
        trigger.unlink(missing_ok=True)
        stop_mesh(mesh)
