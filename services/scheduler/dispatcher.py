"""Admits gateway requests, routes them to worker links, and carries events back.

Work waits in a bounded per-model admission queue (`queue.py`) until a
replica has a free sequence slot and enough reported KV blocks; each pump
round hands a replica at most `max_batch_size` new requests, and with a
`max_queue_delay` the pump waits for a preferred batch size before sending a
partial one. Events pass through as the messages they arrived as (no
re-encoding on the token path); each worker step's batch is split by owning
gateway session, so each hop still sends one message per step.

Failover: the scheduler remembers the token ids and text each request has
delivered. When its replica is lost (stream broken, evicted, or it refuses
with UNAVAILABLE while draining), the request goes back to the head of the
queue with those tokens as `resume_token_ids`: another replica prefills
prompt + delivered tokens and continues, and the client sees one stream with
nothing lost or repeated. The loss of an expert shard is the loss of its
replica: its rank 0's requests move on the same way, and rank 0 is told to
cancel them (which frees their KV blocks, should its engine still run).
"""

from __future__ import annotations

import asyncio
import logging
import math
import pathlib
import random
import time
from dataclasses import dataclass, field

import grpc

from moemesh.services.core.costs import estimate_tokens
from moemesh.services.core.errors import Overloaded, code_name
from moemesh.services.core.logs import request_fields
from moemesh.services.core.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Histogram
from moemesh.services.core.tracing import NO_TRACE, NoTrace, RequestTrace, request_trace
from moemesh.services.scheduler.links import WorkerLink
from moemesh.services.scheduler.queue import RETRY_PRIORITY, AdmissionQueue, Pending, QueueLimits
from moemesh.services.scheduler.registry import Node, Registry
from moemesh.services.scheduler.router import HashRing, affinity_key, choose
from moemesh.v1 import common_pb2, worker_pb2

log = logging.getLogger(__name__)


class Session:
    """One gateway's Dispatch stream: its outbox of event batches."""

    def __init__(self) -> None:
        self.outbox: asyncio.Queue[worker_pb2.EventBatch] = asyncio.Queue()
        self.request_ids: set[str] = set()

    def send(self, events: list[worker_pb2.RequestEvent]) -> None:
        self.outbox.put_nowait(worker_pb2.EventBatch(events=events))


@dataclass(frozen=True)
class DispatchPolicy:
    """Queueing, batching, routing and failover knobs (from SchedulerConfig)."""

    max_queued_requests: int = 1024
    max_queued_tokens: int = 1_000_000
    max_batch_size: int = 32  # new requests handed to one replica per pump round
    max_queue_delay: float = 0.0  # seconds a partial batch may wait for a preferred size
    preferred_batch_sizes: tuple[int, ...] = ()
    affinity_load_guard: float = 0.5
    # Later requests that may go ahead of one that does not fit now, before everything waits for it.
    max_head_bypass: int = 16
    max_failovers: int = 3
    failover_wait: float = 10.0  # how long a request whose replica died waits for another one
    tenant_weights: dict[str, float] = field(default_factory=dict)


@dataclass(eq=False)
class Route:
    """A request the scheduler holds: queued, or running on `node_id`."""

    work: worker_pb2.GenerationWork
    session: Session
    cost: int
    node_id: str | None = None
    token_ids: list[int] = field(default_factory=list)  # delivered to the client so far
    text_chars: int = 0
    failovers: int = 0
    tried: set[str] = field(default_factory=set)
    cancelled: bool = False
    trace: RequestTrace | NoTrace = NO_TRACE  # its span here: queue waits, dispatches, failovers


@dataclass
class DispatchCounters:
    """Totals for metrics: the cancellation pair must agree (every client cancel aborts once)."""

    admitted: int = 0
    rejected: int = 0
    completed: int = 0
    failovers: int = 0
    failed_over_lost: int = 0  # requests that could not fail over (attempts or replicas exhausted)
    client_cancels: int = 0  # cancellations of routed requests sent to a worker
    engine_aborts: int = 0  # requests a worker reported finished with reason ABORT
    queue_cancels: int = 0  # cancelled while still queued (no worker involved)
    deadline_in_queue: int = 0


class Dispatcher:
    """Owns the worker links, the admission queues and the request -> route table."""

    def __init__(self, registry: Registry, policy: DispatchPolicy | None = None,
                 rng: random.Random | None = None, tls_dir: pathlib.Path | None = None,
                 cluster_token: str | None = None) -> None:
        self.tls_dir = tls_dir
        self.cluster_token = cluster_token  # presented to workers
        self.registry = registry
        self.policy = policy or DispatchPolicy()
        self.rng = rng or random.Random()
        self.links: dict[str, WorkerLink] = {}
        self.routes: dict[str, Route] = {}
        self.queues: dict[str, AdmissionQueue] = {}
        self.counters = DispatchCounters()
        self.queue_wait = Histogram("moemesh_scheduler_queue_wait_seconds",
                                    "Time a request waited in its model's admission queue before dispatch.",
                                    LATENCY_BUCKETS, "model")
        self.batch_size = Histogram("moemesh_scheduler_batch_size",
                                    "Requests handed to one replica in one dispatch round (the dynamic batch).",
                                    BATCH_BUCKETS, "model")
        self._completions: list[float] = []  # recent finish times, for retry-after hints
        self._timer: asyncio.TimerHandle | None = None
        self._rings: dict[str, tuple[int, HashRing]] = {}
        registry.on_evict.append(self._node_lost)
        registry.on_unhealthy.append(self._node_unhealthy)
        registry.on_replica_lost.append(self._replica_lost)

    # ---- links -------------------------------------------------------------
    def link(self, node: Node) -> WorkerLink:
        """The execution stream to `node` (rank 0 of a replica: expert shards have none)."""
        link = self.links.get(node.node_id)
        if link is None:
            link = WorkerLink(node.node_id, node.address, self._on_batch, self._on_link_closed, self.tls_dir,
                              self.cluster_token)
            self.links[node.node_id] = link
            link.start()
        return link

    # ---- admission -----------------------------------------------------------
    def submit(self, work: worker_pb2.GenerationWork, session: Session) -> None:
        """Queue one request (refused at once when the queue is full), then dispatch what fits."""
        if work.request_id in self.routes:
            session.send([_error_event(work.request_id, grpc.StatusCode.ALREADY_EXISTS,
                                       f"request {work.request_id!r} is already running")])
            return
        if work.deadline_unix and work.deadline_unix <= time.time():
            session.send([_error_event(work.request_id, grpc.StatusCode.DEADLINE_EXCEEDED,
                                       "deadline passed before the request was queued")])
            return
        problem = _never_fits(work, model_capacity(self.registry.serving(work.model), work.model))
        if problem is not None:  # a static limit: waiting would not help, so no retryable status
            self.counters.rejected += 1
            session.send([_error_event(work.request_id, grpc.StatusCode.INVALID_ARGUMENT, problem)])
            return
        route = Route(work, session, cost=estimate_tokens(work), trace=request_trace("schedule", work.trace_context, {
            "moemesh.request_id": work.client_request_id or work.request_id, "moemesh.model": work.model,
            "moemesh.tenant": work.tenant, "moemesh.priority": work.priority}))
        route.trace.phase("queue wait")
        queue = self._queue(work.model)
        try:
            queue.push(self._pending(route), retry_after=self.retry_after())
        except Overloaded as exc:
            self.counters.rejected += 1
            route.trace.end(error="RESOURCE_EXHAUSTED")
            session.send([_error_event(work.request_id, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                                       retry_after=exc.retry_after)])
            return
        self.counters.admitted += 1
        self.routes[work.request_id] = route
        session.request_ids.add(work.request_id)
        self.pump()

    def cancel(self, request_id: str, reason: str) -> None:
        route = self.routes.get(request_id)
        if route is None or route.cancelled:
            return
        route.cancelled = True
        if route.node_id is None:  # still queued: no worker to tell
            self._queue(route.work.model).remove(request_id)
            self._drop(request_id, route, "CANCELLED")
            self.counters.queue_cancels += 1
            return
        link = self.links.get(route.node_id)
        if link is not None:
            self.counters.client_cancels += 1
            link.send(worker_pb2.ExecuteRequest(cancel=worker_pb2.Cancel(request_id=request_id, reason=reason)))

    def close_session(self, session: Session) -> None:
        """The gateway went away: cancel everything it still had queued or running."""
        for request_id in list(session.request_ids):
            self.cancel(request_id, "client")

    def retry_after(self) -> float:
        """A hint for refused callers: the time the queued work takes at the recent completion rate."""
        now = time.monotonic()
        self._completions = [t for t in self._completions if now - t < 10.0]
        rate = len(self._completions) / 10.0
        queued = sum(len(q) for q in self.queues.values())
        return float(min(30.0, max(0.5, queued / rate if rate else 1.0)))

    # ---- dispatch ------------------------------------------------------------
    def pump(self) -> None:
        """Expire late requests, then hand queued requests to replicas with room."""
        now_unix = time.time()
        for model, queue in self.queues.items():
            for late in queue.expired(now_unix):
                route = late.payload
                self.counters.deadline_in_queue += 1
                self._drop(late.request_id, route, "DEADLINE_EXCEEDED")
                route.session.send([_error_event(late.request_id, grpc.StatusCode.DEADLINE_EXCEEDED,
                                                 "deadline passed while queued")])
            if queue:
                self._pump_model(model, queue)
        self._arm_timer()

    def _pump_model(self, model: str, queue: AdmissionQueue) -> None:
        """Place queued requests in queue order; one that does not fit now lets a bounded number pass it.

        Bypass rule: a request no replica has room for stays queued in its place while later requests that
        fit go ahead of it, at most `max_head_bypass` of them in all; from then on nothing behind it is
        dispatched until it is placed, so the replicas drain until it fits and it is never starved.
        """
        policy = self.policy
        if policy.max_queue_delay > 0 and len(queue) < policy.max_batch_size and queue.oldest_wait() < policy.max_queue_delay:
            if len(queue) not in policy.preferred_batch_sizes and not _has_retry(queue):
                return  # wait a little longer for a fuller batch
        members = self.registry.serving(model)
        if not members:
            self._fail_without_replicas(queue)
            return
        sent: dict[str, int] = {}
        capacity = model_capacity(members, model)
        blocked: Pending | None = None  # the first request that cannot be placed now
        # Only as many requests as the replicas have slots for can be placed, plus those the scan passes over.
        routable = [n for n in members if self.registry.is_routable(n)]
        for item in queue.ahead(_free_slots(routable, policy.max_batch_size) + policy.max_head_bypass + 1):
            route: Route = item.payload
            if self._refuse_if_never_fits(queue, item, capacity):
                continue
            node = self._choose(model, members, route, sent, avoid_tried=bool(route.failovers))
            if node is None and route.failovers:
                node = self._choose(model, members, route, sent, avoid_tried=False)  # no fresh replica: any will do
            if node is None:
                blocked = blocked or item
                continue
            if blocked is not None:
                if blocked.bypassed >= policy.max_head_bypass:
                    break  # it has been passed enough: the replicas drain until it fits
                blocked.bypassed += 1
            queue.take(item)
            self.queue_wait.observe(queue.clock() - item.enqueued_at, model)
            self._send(route, node)
            sent[node.node_id] = sent.get(node.node_id, 0) + 1
        for count in sent.values():
            self.batch_size.observe(count, model)

    def _fail_without_replicas(self, queue: AdmissionQueue) -> None:
        """No replica is registered for the model: fail what is queued, except failovers within their wait."""
        while (head := queue.peek()) is not None:
            route: Route = head.payload
            if route.failovers and queue.clock() - head.enqueued_at < self.policy.failover_wait:
                return  # a replacement replica may register in time
            queue.pop()
            self._drop(head.request_id, route, "UNAVAILABLE")
            route.session.send([_error_event(head.request_id, grpc.StatusCode.UNAVAILABLE,
                                             "no ready replica serves this model", retry_after=1.0)])

    def _refuse_if_never_fits(self, queue: AdmissionQueue, item: Pending, capacity: int | None) -> bool:
        """Refuse (INVALID_ARGUMENT) a queued request that no replica of its model could ever hold."""
        problem = _never_fits(item.payload.work, capacity)
        if problem is None:
            return False
        queue.take(item)
        self._drop(item.request_id, item.payload, "INVALID_ARGUMENT")
        self.counters.rejected += 1
        item.payload.session.send([_error_event(item.request_id, grpc.StatusCode.INVALID_ARGUMENT, problem)])
        return True

    def _choose(self, model: str, members: list[Node], route: Route, sent: dict[str, int],
                avoid_tried: bool) -> Node | None:
        """The replica for `route` among `members` with room for it (None when none has)."""
        limit = self.policy.max_batch_size

        def available(node: Node) -> bool:
            return (self.registry.is_routable(node) and sent.get(node.node_id, 0) < limit
                    and not (avoid_tried and node.node_id in route.tried) and self._has_room(node, route))

        key = affinity_key(route.work.prompt.text, list(route.work.prompt_token_ids))
        return choose(self._ring(model, members), members, available, self.rng, key, self.policy.affinity_load_guard)

    def _ring(self, model: str, members: list[Node]) -> HashRing:
        cached = self._rings.get(model)
        if cached is None or cached[0] != self.registry.version:
            cached = self._rings[model] = (self.registry.version, HashRing(members))
        return cached[1]

    @staticmethod
    def _has_room(node: Node, route: Route) -> bool:
        """A free sequence slot, and the KV blocks the request needs as last reported (an idle replica may try)."""
        if node.in_flight >= node.max_num_seqs:
            return False
        if node.num_kv_blocks and node.in_flight:
            # A sequence never holds more than the replica's pool: an estimate beyond it needs the whole pool.
            need = min(route.cost, node.num_kv_blocks * node.block_size)
            return math.ceil(need / max(node.block_size, 1)) <= node.load.free_kv_blocks
        return True

    def _send(self, route: Route, node: Node) -> None:
        work = route.work
        if route.token_ids:  # a failover: continue after what the client has
            work = worker_pb2.GenerationWork()
            work.CopyFrom(route.work)
            work.resume_token_ids.extend(route.token_ids)
            work.resume_text_chars = route.text_chars
        route.node_id = node.node_id
        route.tried.add(node.node_id)
        node.in_flight += 1
        node.routed_requests += 1
        route.trace.phase("run", {"moemesh.node_id": node.node_id, "moemesh.resumed_tokens": len(route.token_ids)})
        route.trace.inject(work.trace_context)  # the worker's span for the request is this one's child
        self.link(node).send(worker_pb2.ExecuteRequest(add=work))

    # ---- events --------------------------------------------------------------
    def _on_batch(self, node_id: str, batch: worker_pb2.EventBatch) -> None:
        by_session: dict[int, tuple[Session, list[worker_pb2.RequestEvent]]] = {}
        freed = False
        for event in batch.events:
            route = self.routes.get(event.request_id)
            if route is None or route.node_id != node_id:
                continue  # finished, or already failed over: a late event of the old replica
            if event.HasField("error") and event.error.code == grpc.StatusCode.UNAVAILABLE.value[0]:
                self._release_node(route)
                freed = True
                self._requeue(event.request_id, route, f"replica {node_id} refused: {event.error.message}")
                continue
            route.token_ids.extend(event.token_ids)
            route.text_chars += len(event.text)
            if event.finish_reason or event.HasField("error"):
                if event.finish_reason == common_pb2.FINISH_REASON_ABORT:
                    self.counters.engine_aborts += 1
                self._finish(event.request_id, route, code_name(event.error.code) if event.HasField("error") else None)
                freed = True
            by_session.setdefault(id(route.session), (route.session, []))[1].append(event)
        for session, events in by_session.values():
            session.send(events)
        if freed:
            self.pump()

    def _finish(self, request_id: str, route: Route, error: str | None = None) -> None:
        self._release_node(route)
        self._drop(request_id, route, error)
        self.counters.completed += 1
        self._completions.append(time.monotonic())

    def _release_node(self, route: Route) -> None:
        node = self.registry.nodes.get(route.node_id) if route.node_id else None
        if node is not None:
            node.in_flight -= 1
        route.node_id = None

    def _drop(self, request_id: str, route: Route, error: str | None = None) -> None:
        """Forget the request (finished, refused or cancelled; `error` names the status it ended with, if not OK)."""
        self.routes.pop(request_id, None)
        route.session.request_ids.discard(request_id)
        route.trace.end({"moemesh.failovers": route.failovers, "moemesh.delivered_tokens": len(route.token_ids)},
                        error)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request ended", extra={**request_fields(route.work.client_request_id or request_id,
                                                                route.work.trace_context),
                                               "status": error or "OK", "failovers": route.failovers,
                                               "delivered_tokens": len(route.token_ids)})

    def _on_link_closed(self, node_id: str) -> None:
        """A broken execution stream means the node is gone."""
        self.registry.evict(node_id)

    def _node_lost(self, node: Node) -> None:
        """Move the node's in-flight requests to other replicas; drop its link."""
        link = self.links.pop(node.node_id, None)
        if link is not None:
            asyncio.get_running_loop().create_task(link.close())
        lost = [(rid, r) for rid, r in self.routes.items() if r.node_id == node.node_id]
        for request_id, route in lost:
            route.node_id = None  # the node is gone from the registry: nothing to release
            self._requeue(request_id, route, f"replica {node.node_id} was lost")
        if lost:
            log.warning("node lost with requests in flight", extra={"node_id": node.node_id, "lost": len(lost)})
        self.pump()

    def _node_unhealthy(self, node: Node) -> None:
        """A replica that stopped making progress keeps its registration but not its requests: they continue
        elsewhere, and it is told to drop them (should it recover, its late events are ignored)."""
        self._move_off(node, f"replica {node.node_id} stopped making progress")

    def _replica_lost(self, leader: Node, shard: Node) -> None:
        """A shard of `leader`'s replica was lost: the replica cannot compute; its requests continue elsewhere,
        and rank 0 is told to cancel them, freeing their KV blocks (its engine fails anyway at its next exchange
        with the lost shard, and it restarts)."""
        self._move_off(leader, f"replica {leader.replica_group} lost its rank {shard.rank} ({shard.node_id})")

    def _move_off(self, node: Node, why: str) -> None:
        """Cancel `node`'s in-flight requests there and queue them to continue on another replica."""
        link = self.links.get(node.node_id)
        stuck = [(rid, r) for rid, r in self.routes.items() if r.node_id == node.node_id]
        for request_id, route in stuck:
            if link is not None:
                link.send(worker_pb2.ExecuteRequest(cancel=worker_pb2.Cancel(request_id=request_id,
                                                                             reason="failover")))
            self._release_node(route)
            self._requeue(request_id, route, why)
        if stuck:
            log.warning("requests moved off a replica: %s", why, extra={"node_id": node.node_id,
                                                                        "moved": len(stuck)})
            self.pump()

    def _requeue(self, request_id: str, route: Route, why: str) -> None:
        """Send a request that lost its replica to another one, or fail it when it cannot go on."""
        if route.cancelled:  # its client is gone: nothing to continue
            self.counters.engine_aborts += 1  # it ended aborted, as the cancel asked
            self._drop(request_id, route, "CANCELLED")
            return
        route.failovers += 1
        if route.failovers > self.policy.max_failovers:
            self.counters.failed_over_lost += 1
            self._drop(request_id, route, "UNAVAILABLE")
            route.session.send([_error_event(request_id, grpc.StatusCode.UNAVAILABLE,
                                             f"{why}; gave up after {self.policy.max_failovers} failovers")])
            return
        self.counters.failovers += 1
        route.trace.event("failover", {"moemesh.reason": why, "moemesh.delivered_tokens": len(route.token_ids)})
        route.trace.phase("queue wait")
        log.info("request failed over: %s", why, extra={**request_fields(route.work.client_request_id or request_id,
                                                                          route.work.trace_context),
                                                         "failovers": route.failovers,
                                                         "delivered_tokens": len(route.token_ids)})
        pending = self._pending(route)
        pending.priority = RETRY_PRIORITY
        self._queue(route.work.model).push(pending, force=True)

    # ---- helpers -------------------------------------------------------------
    def _queue(self, model: str) -> AdmissionQueue:
        queue = self.queues.get(model)
        if queue is None:
            limits = QueueLimits(self.policy.max_queued_requests, self.policy.max_queued_tokens,
                                 self.policy.tenant_weights)
            queue = self.queues[model] = AdmissionQueue(limits)
        return queue

    @staticmethod
    def _pending(route: Route) -> Pending:
        work = route.work
        return Pending(request_id=work.request_id, tenant=work.tenant, priority=work.priority, cost=route.cost,
                       deadline=work.deadline_unix or None, payload=route)

    def _arm_timer(self) -> None:
        """While anything is queued, pump again shortly: deadlines, queue delay, replicas freeing up."""
        if self._timer is not None or not any(self.queues.values()):
            return
        loop = asyncio.get_running_loop()
        delay = self.policy.max_queue_delay or 0.05

        def fire() -> None:
            self._timer = None
            self.pump()

        self._timer = loop.call_later(min(delay, 0.05), fire)


def _free_slots(routable: list[Node], max_batch_size: int) -> int:
    """Requests the `routable` replicas could take in one pump round."""
    return sum(max(0, min(n.max_num_seqs - n.in_flight, max_batch_size)) for n in routable)


def token_capacity(node: Node, model: str) -> int | None:
    """The longest sequence (prompt + output tokens) `node` can hold for `model`; None when it reported no limit."""
    limits = [m.max_context_tokens for m in node.models if m.model_id == model and m.max_context_tokens]
    if node.num_kv_blocks:
        limits.append(node.num_kv_blocks * node.block_size)
    return min(limits) if limits else None


def model_capacity(members: list[Node], model: str) -> int | None:
    """The longest sequence any of `members` can hold for `model`; None when unknown (no members, or one that
    reported no limit)."""
    capacities = [token_capacity(node, model) for node in members]
    if not capacities or None in capacities:
        return None
    return max(capacities)


def _never_fits(work: worker_pb2.GenerationWork, largest: int | None) -> str | None:
    """Why no replica could ever hold the request ("field: reason"), given the `largest` sequence one holds.

    Only what is certain counts: prompt token ids (a text prompt's length is known only once the worker
    tokenizes it, so it counts as one token) and an explicit max_tokens.
    """
    if largest is None:
        return None
    prompt = len(work.prompt_token_ids) + len(work.resume_token_ids) or 1
    if work.prompt_token_ids and prompt >= largest:
        return (f"prompt_token_ids: {prompt} tokens; the most any replica of {work.model!r} holds is {largest} "
                "(prompt and output together)")
    output = work.sampling.max_tokens if work.sampling.HasField("max_tokens") else 0
    if prompt + output > largest:
        return (f"max_tokens: prompt {prompt} + max_tokens {output} = {prompt + output} tokens; the most any "
                f"replica of {work.model!r} holds is {largest}")
    return None


def _has_retry(queue: AdmissionQueue) -> bool:
    head = queue.peek()
    return head is not None and head.priority == RETRY_PRIORITY


def _error_event(request_id: str, code: grpc.StatusCode, message: str,
                 retry_after: float = 0.0) -> worker_pb2.RequestEvent:
    return worker_pb2.RequestEvent(
        request_id=request_id,
        error=worker_pb2.RequestError(code=code.value[0], message=message, retry_after_seconds=retry_after),
    )
