"""The dispatcher with fake worker links and fake nodes: admission, capacity, failover, cancellation (no network)."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest

from moemesh.services.scheduler import dispatcher as dispatcher_module
from moemesh.services.scheduler.dispatcher import Dispatcher, DispatchPolicy, Session
from moemesh.services.scheduler.registry import Load, Node, NodeState, Registry, ServedModel
from moemesh.v1 import common_pb2, worker_pb2

MODEL = ServedModel(model_id="demo", revision="r1", kind="generation")
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
assert (RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, UNAVAILABLE) == (8, 4, 14)


class FakeLink:
    """Stands in for a WorkerLink: records what the dispatcher sends, opens no channel."""

    def __init__(self, node_id: str, *_args) -> None:
        self.node_id = node_id
        self.channel = None
        self.sent: list[worker_pb2.ExecuteRequest] = []
        self.closed = False

    def start(self) -> None:
        pass

    def send(self, message: worker_pb2.ExecuteRequest) -> None:
        self.sent.append(message)

    async def close(self) -> None:
        self.closed = True

    def adds(self) -> list[worker_pb2.GenerationWork]:
        return [m.add for m in self.sent if m.WhichOneof("kind") == "add"]

    def added_ids(self) -> list[str]:
        return [w.request_id for w in self.adds()]

    def cancels(self) -> list[str]:
        return [m.cancel.request_id for m in self.sent if m.WhichOneof("kind") == "cancel"]


class FakeTime:
    """Replaces the dispatcher module's `time`: a Unix clock the test moves."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


class Mesh:
    """A registry, a dispatcher and one fake link per registered node."""

    def __init__(self, policy: DispatchPolicy | None = None) -> None:
        self.registry = Registry(heartbeat_interval=1.0, max_missed=3)
        self.dispatcher = Dispatcher(self.registry, policy or DispatchPolicy(), rng=random.Random(0))
        self.links: dict[str, FakeLink] = {}

    def add_node(self, node_id: str, max_num_seqs: int = 4, **kwargs) -> Node:
        node = Node(node_id=node_id, address=f"10.0.0.1:{5000 + len(self.links)}", models=(MODEL,),
                    replica_group=node_id, max_num_seqs=max_num_seqs, **kwargs)
        self.registry.register(node)
        link = self.links[node_id] = FakeLink(node_id)
        self.dispatcher.links[node_id] = link
        return node

    def all_adds(self) -> list[str]:
        return [rid for link in self.links.values() for rid in link.added_ids()]

    def node_of(self, request_id: str) -> str | None:
        return self.dispatcher.routes[request_id].node_id


@pytest.fixture(autouse=True)
def no_real_links(monkeypatch):
    """Any link the dispatcher would open itself is a fake one (a test that forgets a node opens no channel)."""
    monkeypatch.setattr(dispatcher_module, "WorkerLink", FakeLink)


@pytest.fixture
def fake_time(monkeypatch) -> FakeTime:
    clock = FakeTime()
    monkeypatch.setattr(dispatcher_module, "time", clock)
    return clock


def work(request_id: str, prompt: str = "hello there", max_tokens: int = 16, deadline: float = 0.0, tenant: str = "",
         priority: int = 0, model: str = "demo") -> worker_pb2.GenerationWork:
    return worker_pb2.GenerationWork(
        request_id=request_id, model=model, prompt=common_pb2.Prompt(text=prompt),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens), deadline_unix=deadline, tenant=tenant,
        priority=priority,
    )


def event(request_id: str, token_ids: tuple[int, ...] | list[int] = (), text: str = "",
          finish: int = 0) -> worker_pb2.RequestEvent:
    return worker_pb2.RequestEvent(request_id=request_id, token_ids=list(token_ids), text=text, finish_reason=finish)


def error_event(request_id: str, code: int, message: str = "boom") -> worker_pb2.RequestEvent:
    return worker_pb2.RequestEvent(request_id=request_id, error=worker_pb2.RequestError(code=code, message=message))


def batch(*events: worker_pb2.RequestEvent) -> worker_pb2.EventBatch:
    return worker_pb2.EventBatch(events=list(events))


def received(session: Session) -> list[worker_pb2.RequestEvent]:
    out = []
    while not session.outbox.empty():
        out.extend(session.outbox.get_nowait().events)
    return out


def errors(events: list[worker_pb2.RequestEvent]) -> list[tuple[str, int]]:
    return [(e.request_id, e.error.code) for e in events if e.HasField("error")]


# ---- admission and capacity ------------------------------------------------------------------------------------------

async def test_request_goes_to_a_ready_node_with_a_free_slot():
    mesh = Mesh()
    node = mesh.add_node("A", max_num_seqs=2)
    session = Session()
    mesh.dispatcher.submit(work("r1"), session)
    assert mesh.links["A"].added_ids() == ["r1"]
    sent = mesh.links["A"].adds()[0]
    assert sent.prompt.text == "hello there" and sent.sampling.max_tokens == 16 and not sent.resume_token_ids
    assert node.in_flight == 1 and node.routed_requests == 1
    assert mesh.node_of("r1") == "A" and "r1" in session.request_ids
    assert mesh.dispatcher.counters.admitted == 1
    assert received(session) == []


async def test_full_nodes_keep_the_request_queued_until_a_finish_frees_a_slot():
    mesh = Mesh()
    a, b = mesh.add_node("A", max_num_seqs=1), mesh.add_node("B", max_num_seqs=1)
    session = Session()
    for rid in ("r1", "r2", "r3"):
        mesh.dispatcher.submit(work(rid), session)
    assert sorted(mesh.all_adds()) == ["r1", "r2"]
    assert a.in_flight == 1 and b.in_flight == 1
    assert "r3" in mesh.dispatcher.queues["demo"] and mesh.node_of("r3") is None
    mesh.dispatcher.pump()
    assert "r3" not in mesh.all_adds(), "no slot is free yet"

    holder = mesh.node_of("r1")
    mesh.dispatcher._on_batch(holder, batch(event("r1", [1, 2], "hi", finish=common_pb2.FINISH_REASON_STOP)))
    assert mesh.links[holder].added_ids()[-1] == "r3"
    assert mesh.registry.nodes[holder].in_flight == 1
    assert "r1" not in mesh.dispatcher.routes and len(mesh.dispatcher.queues["demo"]) == 0
    assert mesh.dispatcher.counters.completed == 1
    events = received(session)
    assert [(e.request_id, list(e.token_ids), e.text) for e in events] == [("r1", [1, 2], "hi")]


async def test_events_without_finish_keep_the_slot():
    mesh = Mesh()
    node = mesh.add_node("A", max_num_seqs=1)
    session = Session()
    mesh.dispatcher.submit(work("r1"), session)
    mesh.dispatcher.submit(work("r2"), session)
    mesh.dispatcher._on_batch("A", batch(event("r1", [7], "x")))
    assert node.in_flight == 1 and mesh.links["A"].added_ids() == ["r1"]
    assert [e.text for e in received(session)] == ["x"]


async def test_queue_full_is_resource_exhausted_with_retry_after():
    mesh = Mesh(DispatchPolicy(max_queued_requests=2))
    mesh.add_node("A", max_num_seqs=1)
    session = Session()
    for rid in ("run", "q1", "q2"):
        mesh.dispatcher.submit(work(rid), session)
    assert received(session) == []
    mesh.dispatcher.submit(work("q3"), session)
    events = received(session)
    assert errors(events) == [("q3", RESOURCE_EXHAUSTED)]
    assert events[0].error.retry_after_seconds > 0
    assert mesh.dispatcher.counters.rejected == 1 and mesh.dispatcher.counters.admitted == 3
    assert "q3" not in mesh.dispatcher.routes and "q3" not in session.request_ids


async def test_token_bound_is_resource_exhausted():
    mesh = Mesh(DispatchPolicy(max_queued_tokens=100))
    mesh.add_node("A", max_num_seqs=1)
    session = Session()
    mesh.dispatcher.submit(work("small", max_tokens=10), session)
    mesh.dispatcher.submit(work("huge", max_tokens=500), session)
    assert errors(received(session)) == [("huge", RESOURCE_EXHAUSTED)]
    assert mesh.links["A"].added_ids() == ["small"]


async def test_an_unset_max_tokens_costs_the_contracts_default_of_128():
    mesh = Mesh()
    mesh.add_node("A")
    session = Session()
    unset = worker_pb2.GenerationWork(request_id="unset", model="demo", prompt=common_pb2.Prompt(text="hello there"))
    mesh.dispatcher.submit(unset, session)
    assert mesh.dispatcher.routes["unset"].cost == 11 // 4 + 1 + 128, "prompt chars / 4 + 1, plus the default 128"


async def test_duplicate_request_id_is_refused():
    mesh = Mesh()
    mesh.add_node("A")
    session = Session()
    mesh.dispatcher.submit(work("r1"), session)
    mesh.dispatcher.submit(work("r1"), session)
    assert errors(received(session)) == [("r1", grpc.StatusCode.ALREADY_EXISTS.value[0])]
    assert mesh.links["A"].added_ids() == ["r1"]


async def test_no_replica_for_the_model_is_unavailable_at_once():
    mesh = Mesh()
    mesh.add_node("A")  # serves "demo" only
    session = Session()
    mesh.dispatcher.submit(work("r1", model="other"), session)
    events = received(session)
    assert errors(events) == [("r1", UNAVAILABLE)]
    assert events[0].error.retry_after_seconds > 0
    assert mesh.all_adds() == [] and "r1" not in mesh.dispatcher.routes and not session.request_ids


async def test_no_node_at_all_is_unavailable_at_once():
    mesh = Mesh()
    session = Session()
    mesh.dispatcher.submit(work("r1"), session)
    assert errors(received(session)) == [("r1", UNAVAILABLE)]
    assert mesh.dispatcher.routes == {}


async def test_registered_but_not_ready_node_keeps_requests_waiting():
    mesh = Mesh()
    node = mesh.add_node("A")
    node.state = NodeState.DRAINING
    session = Session()
    mesh.dispatcher.submit(work("r1"), session)
    assert received(session) == [] and mesh.all_adds() == []
    node.state = NodeState.READY
    mesh.dispatcher.pump()
    assert mesh.links["A"].added_ids() == ["r1"]


# ---- deadlines -----------------------------------------------------------------------------------------------------

async def test_deadline_already_passed_is_refused_at_submit():
    mesh = Mesh()
    mesh.add_node("A")
    session = Session()
    mesh.dispatcher.submit(work("late", deadline=time.time() - 1.0), session)
    assert errors(received(session)) == [("late", DEADLINE_EXCEEDED)]
    assert mesh.all_adds() == [] and "late" not in mesh.dispatcher.routes


async def test_deadline_passing_while_queued(fake_time):
    mesh = Mesh()
    mesh.add_node("A", max_num_seqs=1)
    session = Session()
    mesh.dispatcher.submit(work("run"), session)
    mesh.dispatcher.submit(work("waits", deadline=fake_time.now + 5.0), session)
    mesh.dispatcher.submit(work("patient", deadline=fake_time.now + 60.0), session)
    fake_time.now += 10.0
    mesh.dispatcher.pump()
    assert errors(received(session)) == [("waits", DEADLINE_EXCEEDED)]
    assert mesh.dispatcher.counters.deadline_in_queue == 1
    assert "waits" not in mesh.dispatcher.routes and "waits" not in session.request_ids
    mesh.dispatcher._on_batch("A", batch(event("run", finish=common_pb2.FINISH_REASON_LENGTH)))
    assert mesh.links["A"].added_ids() == ["run", "patient"], "the expired request was never sent"


# ---- failover ------------------------------------------------------------------------------------------------------

async def _running_on_a_with_output(mesh: Mesh, session: Session) -> None:
    mesh.add_node("A")
    mesh.dispatcher.submit(work("r1"), session)
    assert mesh.links["A"].added_ids() == ["r1"]
    mesh.add_node("B")
    mesh.dispatcher._on_batch("A", batch(event("r1", [5], "a")))
    mesh.dispatcher._on_batch("A", batch(event("r1", [6, 7], "bc")))
    assert [e.text for e in received(session)] == ["a", "bc"]


async def test_evicted_node_fails_over_with_resume_tokens():
    mesh = Mesh()
    session = Session()
    await _running_on_a_with_output(mesh, session)
    link_a = mesh.links["A"]
    mesh.registry.evict("A")
    await asyncio.sleep(0)  # let the link close
    assert link_a.closed and "A" not in mesh.dispatcher.links
    resent = mesh.links["B"].adds()
    assert [w.request_id for w in resent] == ["r1"]
    assert list(resent[0].resume_token_ids) == [5, 6, 7] and resent[0].resume_text_chars == 3
    assert resent[0].prompt.text == "hello there"
    assert mesh.node_of("r1") == "B" and mesh.registry.nodes["B"].in_flight == 1
    assert mesh.dispatcher.counters.failovers == 1
    assert received(session) == [], "the client sees no error: the stream goes on"

    mesh.dispatcher._on_batch("A", batch(event("r1", [99], "zz")))  # a late event of the lost replica
    assert received(session) == []
    mesh.dispatcher._on_batch("B", batch(event("r1", [8], "d", finish=common_pb2.FINISH_REASON_STOP)))
    events = received(session)
    assert [(list(e.token_ids), e.text, e.finish_reason) for e in events] == [([8], "d", common_pb2.FINISH_REASON_STOP)]
    assert "r1" not in mesh.dispatcher.routes and mesh.registry.nodes["B"].in_flight == 0


async def test_second_failover_resumes_after_everything_delivered():
    mesh = Mesh()
    session = Session()
    await _running_on_a_with_output(mesh, session)
    mesh.registry.evict("A")
    mesh.dispatcher._on_batch("B", batch(event("r1", [8, 9], "de")))
    mesh.add_node("C")
    mesh.registry.evict("B")
    resent = mesh.links["C"].adds()
    assert [w.request_id for w in resent] == ["r1"]
    assert list(resent[0].resume_token_ids) == [5, 6, 7, 8, 9] and resent[0].resume_text_chars == 5
    assert mesh.dispatcher.counters.failovers == 2
    assert [e.text for e in received(session)] == ["de"]


async def test_no_failover_allowed_is_unavailable():
    mesh = Mesh(DispatchPolicy(max_failovers=0))
    session = Session()
    await _running_on_a_with_output(mesh, session)
    mesh.registry.evict("A")
    assert errors(received(session)) == [("r1", UNAVAILABLE)]
    assert mesh.links["B"].adds() == []
    assert mesh.dispatcher.counters.failovers == 0 and mesh.dispatcher.counters.failed_over_lost == 1
    assert "r1" not in mesh.dispatcher.routes and not session.request_ids


async def test_worker_unavailable_error_resends_to_another_node():
    mesh = Mesh()
    session = Session()
    await _running_on_a_with_output(mesh, session)
    node_a = mesh.registry.nodes["A"]
    mesh.dispatcher._on_batch("A", batch(error_event("r1", UNAVAILABLE, "draining")))
    assert received(session) == [], "the refusal is not forwarded: the request goes on elsewhere"
    assert node_a.in_flight == 0
    resent = mesh.links["B"].adds()
    assert [w.request_id for w in resent] == ["r1"] and list(resent[0].resume_token_ids) == [5, 6, 7]
    assert mesh.node_of("r1") == "B" and mesh.dispatcher.counters.failovers == 1
    assert mesh.links["A"].added_ids() == ["r1"], "the refusing replica is not asked again"


async def test_other_worker_errors_end_the_request():
    mesh = Mesh()
    node = mesh.add_node("A")
    mesh.add_node("B")
    session = Session()
    mesh.dispatcher.submit(work("r1"), session)
    holder = mesh.node_of("r1")
    mesh.dispatcher._on_batch(holder, batch(error_event("r1", grpc.StatusCode.INVALID_ARGUMENT.value[0])))
    assert errors(received(session)) == [("r1", grpc.StatusCode.INVALID_ARGUMENT.value[0])]
    assert mesh.all_adds() == ["r1"] and mesh.dispatcher.counters.failovers == 0
    assert "r1" not in mesh.dispatcher.routes and node.in_flight + mesh.registry.nodes["B"].in_flight == 0


async def test_refusal_by_the_only_replica_does_not_block_other_requests():
    """A retry that every live replica already failed must not hold the model's whole queue.

    Single replica A (4 slots). It refuses r1 with UNAVAILABLE (it stays registered and ready). r1 is requeued as a
    retry that avoids A; r2, submitted next, can only go to A, which has free slots, and must be sent.
    """
    mesh = Mesh()
    mesh.add_node("A", max_num_seqs=4)
    session = Session()
    mesh.dispatcher.submit(work("r1"), session)
    mesh.dispatcher._on_batch("A", batch(error_event("r1", UNAVAILABLE, "transient")))
    mesh.dispatcher.submit(work("r2"), session)
    mesh.dispatcher.pump()
    assert "r2" in mesh.links["A"].added_ids(), "r2 waits behind a retry that can never be placed"


# ---- cancellation ----------------------------------------------------------------------------------------------------

async def test_cancel_running_request_and_abort_round_trip():
    mesh = Mesh()
    node = mesh.add_node("A")
    session = Session()
    mesh.dispatcher.submit(work("r1"), session)
    mesh.dispatcher.cancel("r1", "client")
    assert mesh.links["A"].cancels() == ["r1"]
    assert mesh.dispatcher.counters.client_cancels == 1
    assert "r1" in mesh.dispatcher.routes, "still running until the worker confirms"
    mesh.dispatcher._on_batch("A", batch(event("r1", finish=common_pb2.FINISH_REASON_ABORT)))
    counters = mesh.dispatcher.counters
    assert counters.engine_aborts == 1 and counters.client_cancels == counters.engine_aborts
    assert "r1" not in mesh.dispatcher.routes and node.in_flight == 0
    assert [e.finish_reason for e in received(session)] == [common_pb2.FINISH_REASON_ABORT]


async def test_cancel_queued_request_sends_nothing():
    mesh = Mesh()
    mesh.add_node("A", max_num_seqs=1)
    session = Session()
    mesh.dispatcher.submit(work("run"), session)
    mesh.dispatcher.submit(work("queued"), session)
    mesh.dispatcher.cancel("queued", "client")
    counters = mesh.dispatcher.counters
    assert counters.queue_cancels == 1 and counters.client_cancels == 0
    assert "queued" not in mesh.dispatcher.routes and "queued" not in session.request_ids
    assert len(mesh.dispatcher.queues["demo"]) == 0
    mesh.dispatcher._on_batch("A", batch(event("run", finish=common_pb2.FINISH_REASON_STOP)))
    mesh.dispatcher.pump()
    assert mesh.links["A"].added_ids() == ["run"] and mesh.links["A"].cancels() == []
    mesh.dispatcher.cancel("queued", "client")  # unknown by now: a no-op
    assert counters.queue_cancels == 1


async def test_close_session_cancels_all_its_requests():
    mesh = Mesh()
    mesh.add_node("A", max_num_seqs=2)
    mine, other = Session(), Session()
    for rid in ("m1", "m2", "m3"):
        mesh.dispatcher.submit(work(rid), mine)
    mesh.dispatcher.submit(work("o1"), other)
    assert mesh.links["A"].added_ids() == ["m1", "m2"]
    mesh.dispatcher.close_session(mine)
    assert sorted(mesh.links["A"].cancels()) == ["m1", "m2"]
    counters = mesh.dispatcher.counters
    assert counters.client_cancels == 2 and counters.queue_cancels == 1
    assert "m3" not in mesh.dispatcher.routes and "o1" in mesh.dispatcher.routes
    mesh.dispatcher._on_batch("A", batch(event("m1", finish=common_pb2.FINISH_REASON_ABORT),
                                         event("m2", finish=common_pb2.FINISH_REASON_ABORT)))
    assert counters.engine_aborts == counters.client_cancels == 2
    assert mesh.links["A"].added_ids() == ["m1", "m2", "o1"], "the freed slots go to the other session"
    assert not mine.request_ids


async def test_cancel_then_session_close_cancels_once():
    """A gateway that cancels a request and then goes away: the worker gets one Cancel and the counters agree."""
    mesh = Mesh()
    mesh.add_node("A")
    session = Session()
    mesh.dispatcher.submit(work("r1"), session)
    mesh.dispatcher.cancel("r1", "client")
    mesh.dispatcher.close_session(session)
    mesh.dispatcher._on_batch("A", batch(event("r1", finish=common_pb2.FINISH_REASON_ABORT)))
    counters = mesh.dispatcher.counters
    assert mesh.links["A"].cancels() == ["r1"]
    assert counters.client_cancels == counters.engine_aborts == 1


async def test_cancelled_request_is_not_failed_over():
    """A request cancelled on A whose replica is lost before the abort arrives must not start again on B."""
    mesh = Mesh()
    mesh.add_node("A")
    session = Session()
    mesh.dispatcher.submit(work("r1"), session)
    mesh.add_node("B")
    mesh.dispatcher.cancel("r1", "client")
    mesh.registry.evict("A")
    assert mesh.links["B"].adds() == [], "the cancelled request was restarted on another replica"


# ---- replica health and batching ------------------------------------------------------------------------------------

async def test_hung_node_gets_no_new_requests():
    """Heartbeats still arrive, but the engine has running work and no progress past the hang timeout (30 s)."""
    mesh = Mesh()
    hung = mesh.add_node("hung", max_num_seqs=8)
    mesh.add_node("ok", max_num_seqs=8)
    assert mesh.registry.heartbeat("hung", hung.lease_id, Load(running_seqs=2, seconds_since_progress=45.0))
    session = Session()
    for i in range(6):
        mesh.dispatcher.submit(work(f"r{i}", prompt=f"prompt {i}"), session)
    assert mesh.links["hung"].adds() == []
    assert len(mesh.links["ok"].adds()) == 6
    assert received(session) == []


async def test_hung_only_node_keeps_requests_queued_until_it_moves():
    mesh = Mesh()
    node = mesh.add_node("A", max_num_seqs=8)
    assert mesh.registry.heartbeat("A", node.lease_id, Load(running_seqs=1, seconds_since_progress=31.0))
    session = Session()
    mesh.dispatcher.submit(work("r1"), session)
    assert mesh.all_adds() == [] and received(session) == [], "registered, so the request waits instead of failing"
    assert mesh.registry.heartbeat("A", node.lease_id, Load(running_seqs=1, seconds_since_progress=0.1))
    mesh.dispatcher.pump()
    assert mesh.all_adds() == ["r1"]


async def test_idle_node_with_stale_progress_is_not_hung():
    mesh = Mesh()
    node = mesh.add_node("A")
    assert mesh.registry.heartbeat("A", node.lease_id, Load(running_seqs=0, seconds_since_progress=500.0))
    mesh.dispatcher.submit(work("r1"), Session())
    assert mesh.all_adds() == ["r1"]


async def test_max_batch_size_caps_one_pump_round_per_node():
    mesh = Mesh(DispatchPolicy(max_batch_size=2))
    node = mesh.add_node("A", max_num_seqs=16)
    node.state = NodeState.DRAINING  # registered but not routable: requests wait
    session = Session()
    for i in range(5):
        mesh.dispatcher.submit(work(f"r{i}"), session)
    assert mesh.all_adds() == [] and len(mesh.dispatcher.queues["demo"]) == 5
    node.state = NodeState.READY
    mesh.dispatcher.pump()
    assert mesh.links["A"].added_ids() == ["r0", "r1"]
    assert len(mesh.dispatcher.queues["demo"]) == 3
    mesh.dispatcher.pump()
    assert mesh.links["A"].added_ids() == ["r0", "r1", "r2", "r3"]


async def test_max_batch_size_is_per_node():
    mesh = Mesh(DispatchPolicy(max_batch_size=2))
    a, b = mesh.add_node("A", max_num_seqs=16), mesh.add_node("B", max_num_seqs=16)
    a.state = b.state = NodeState.DRAINING
    session = Session()
    for i in range(5):
        mesh.dispatcher.submit(work(f"r{i}", prompt=f"distinct prompt {i}"), session)
    a.state = b.state = NodeState.READY
    mesh.dispatcher.pump()
    assert len(mesh.links["A"].adds()) == 2 and len(mesh.links["B"].adds()) == 2
    assert len(mesh.dispatcher.queues["demo"]) == 1


async def test_priority_and_retry_order_in_the_dispatcher():
    mesh = Mesh()
    node = mesh.add_node("A", max_num_seqs=1)
    session = Session()
    mesh.dispatcher.submit(work("run"), session)
    mesh.dispatcher.submit(work("low", priority=0), session)
    mesh.dispatcher.submit(work("high", priority=5), session)
    mesh.dispatcher._on_batch("A", batch(event("run", finish=common_pb2.FINISH_REASON_STOP)))
    assert mesh.links["A"].added_ids() == ["run", "high"]
    assert node.in_flight == 1


# ---- head-of-line blocking and requests that can never fit -----------------------------------------------------------

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
SIZED = ServedModel(model_id="demo", revision="r1", kind="generation", max_context_tokens=256)


def token_work(request_id: str, prompt_tokens: int, max_tokens: int, priority: int = 0) -> worker_pb2.GenerationWork:
    """A request whose size the scheduler knows exactly: prompt token ids plus max_tokens."""
    return worker_pb2.GenerationWork(request_id=request_id, model="demo", priority=priority,
                                     prompt_token_ids=[5 + i % 100 for i in range(prompt_tokens)],
                                     sampling=common_pb2.SamplingParams(max_tokens=max_tokens))


def busy_sized_node(mesh: Mesh, free_kv_blocks: int) -> Node:
    """Replica A: 8 slots, a pool of 16 blocks of 16 tokens (256), one request running, `free_kv_blocks` free."""
    node = mesh.add_node("A", max_num_seqs=8, num_kv_blocks=16, block_size=16)
    node.models = (SIZED,)
    mesh.dispatcher.submit(token_work("running", 16, 16), Session())
    assert mesh.registry.heartbeat("A", node.lease_id, Load(running_seqs=1, free_kv_blocks=free_kv_blocks))
    return node


async def test_a_request_that_does_not_fit_now_lets_smaller_ones_behind_it_pass():
    mesh = Mesh()
    busy_sized_node(mesh, free_kv_blocks=4)  # 64 tokens free
    session = Session()
    mesh.dispatcher.submit(token_work("big", 100, 100, priority=5), session)  # 13 blocks: not now
    for i in range(3):
        mesh.dispatcher.submit(token_work(f"small{i}", 8, 8), session)  # 1 block each
    assert mesh.links["A"].added_ids() == ["running", "small0", "small1", "small2"], "the big head blocks nobody"
    queue = mesh.dispatcher.queues["demo"]
    assert [p.request_id for p in queue] == ["big"] and queue.peek().bypassed == 3
    assert received(session) == [], "the big one waits, it is not refused"

    mesh.registry.heartbeat("A", mesh.registry.nodes["A"].lease_id, Load(running_seqs=1, free_kv_blocks=14))
    mesh.dispatcher.pump()
    assert mesh.links["A"].added_ids()[-1] == "big", "placed once its blocks are free"


async def test_bypass_is_bounded_so_the_big_request_is_not_starved():
    mesh = Mesh(DispatchPolicy(max_head_bypass=2))
    node = busy_sized_node(mesh, free_kv_blocks=4)
    session = Session()
    mesh.dispatcher.submit(token_work("big", 100, 100), session)
    for i in range(4):
        mesh.dispatcher.submit(token_work(f"small{i}", 8, 8), session)
    assert mesh.links["A"].added_ids() == ["running", "small0", "small1"], "two may pass, then everything waits"
    mesh.dispatcher._on_batch("A", batch(event("small0", [1], "x", finish=common_pb2.FINISH_REASON_STOP)))
    assert "small2" not in mesh.links["A"].added_ids(), "a freed slot does not go to the requests behind the big one"

    mesh.registry.heartbeat("A", node.lease_id, Load(running_seqs=2, free_kv_blocks=13))  # the replica drained
    mesh.dispatcher.pump()
    assert mesh.links["A"].added_ids()[3:] == ["big", "small2", "small3"], "the big one first, then the rest in order"


async def test_a_request_larger_than_every_replica_is_refused_at_once_naming_the_field_and_limit():
    mesh = Mesh()
    busy_sized_node(mesh, free_kv_blocks=4)
    b = mesh.add_node("B", max_num_seqs=8, num_kv_blocks=8, block_size=16)  # the pool (128 tokens) is the limit
    b.models = (ServedModel(model_id="demo", revision="r1", kind="generation", max_context_tokens=2048),)
    session = Session()
    mesh.dispatcher.submit(token_work("too-long-output", 200, 100, priority=9), session)
    mesh.dispatcher.submit(token_work("too-long-prompt", 300, 0), session)
    mesh.dispatcher.submit(token_work("small", 8, 8), session)
    events = received(session)
    assert errors(events) == [("too-long-output", INVALID_ARGUMENT), ("too-long-prompt", INVALID_ARGUMENT)]
    assert events[0].error.message.startswith("max_tokens: prompt 200 + max_tokens 100 = 300 tokens")
    assert "256" in events[0].error.message, "the limit is the largest replica's (A's context), not B's pool"
    assert events[1].error.message.startswith("prompt_token_ids: 300 tokens")
    assert "small" in mesh.all_adds() and not {"too-long-output", "too-long-prompt"} & set(mesh.dispatcher.routes)
    assert mesh.dispatcher.counters.rejected == 2 and mesh.dispatcher.counters.admitted == 2


async def test_a_text_prompt_is_not_refused_on_an_estimate():
    mesh = Mesh()
    busy_sized_node(mesh, free_kv_blocks=16)
    session = Session()
    mesh.dispatcher.submit(work("long-text", prompt="x" * 4000, max_tokens=16), session)  # ~1,000 estimated tokens
    assert received(session) == [], "its real length is known only to the worker, which checks it exactly"
    assert "long-text" in mesh.links["A"].added_ids(), "an estimate beyond the pool needs the whole pool, no more"


async def test_a_queued_request_is_refused_when_the_replicas_that_could_hold_it_leave():
    mesh = Mesh()
    small = mesh.add_node("small", max_num_seqs=1, num_kv_blocks=8, block_size=16)
    big = mesh.add_node("big", max_num_seqs=1, num_kv_blocks=64, block_size=16)
    session = Session()
    mesh.dispatcher.submit(token_work("r1", 16, 16), session)
    mesh.dispatcher.submit(token_work("r2", 16, 16), session)
    mesh.dispatcher.submit(token_work("long", 300, 100), session)  # only "big" (1,024 tokens) could hold it
    assert "long" in mesh.dispatcher.queues["demo"]
    mesh.registry.evict(big.node_id)
    assert ("long", INVALID_ARGUMENT) in errors(received(session))
    assert "long" not in mesh.dispatcher.queues["demo"] and small.in_flight == 1


# ---- unhealthy replicas ------------------------------------------------------------------------------------------------

async def test_requests_on_a_replica_that_turns_unhealthy_fail_over_with_resume_tokens():
    mesh = Mesh()
    session = Session()
    await _running_on_a_with_output(mesh, session)
    a = mesh.registry.nodes["A"]
    assert mesh.registry.heartbeat("A", a.lease_id, Load(running_seqs=1, seconds_since_progress=31.0))
    assert a.state == NodeState.UNHEALTHY and "A" in mesh.registry.nodes, "still registered: its heartbeats arrive"
    assert mesh.links["A"].cancels() == ["r1"], "the hung replica is told to drop the request"
    resent = mesh.links["B"].adds()
    assert [w.request_id for w in resent] == ["r1"] and list(resent[0].resume_token_ids) == [5, 6, 7]
    assert mesh.node_of("r1") == "B" and a.in_flight == 0 and mesh.dispatcher.counters.failovers == 1
    assert received(session) == [], "the client sees no error"

    mesh.dispatcher._on_batch("A", batch(event("r1", [99], "late", finish=common_pb2.FINISH_REASON_ABORT)))
    assert received(session) == [] and mesh.node_of("r1") == "B", "a late event of the hung replica is ignored"
    assert mesh.registry.heartbeat("A", a.lease_id, Load(running_seqs=1, seconds_since_progress=32.0))
    assert mesh.dispatcher.counters.failovers == 1, "staying unhealthy moves nothing twice"
