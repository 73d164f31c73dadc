"""Routes gateway requests to worker links and worker events back to gateways.

The scheduler is a forwarding hop here: work and events pass through as the
messages they arrived as (no re-encoding on the token path); only the
routing decision reads their fields. Each worker step's batch is split by
owning gateway session, so each hop still sends one message per step.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

import grpc

from moemesh.services.core.errors import MeshError
from moemesh.services.scheduler.links import WorkerLink
from moemesh.services.scheduler.registry import Node, Registry
from moemesh.services.scheduler.router import pick_node
from moemesh.v1 import worker_pb2

log = logging.getLogger(__name__)


class Session:
    """One gateway's Dispatch stream: its outbox of event batches."""

    def __init__(self) -> None:
        self.outbox: asyncio.Queue[worker_pb2.EventBatch] = asyncio.Queue()
        self.request_ids: set[str] = set()

    def send(self, events: list[worker_pb2.RequestEvent]) -> None:
        self.outbox.put_nowait(worker_pb2.EventBatch(events=events))


@dataclass
class Route:
    session: Session
    node_id: str


class Dispatcher:
    """Owns the worker links and the request -> (session, node) table."""

    def __init__(self, registry: Registry, rng: random.Random | None = None) -> None:
        self.registry = registry
        self.rng = rng or random.Random()
        self.links: dict[str, WorkerLink] = {}
        self.routes: dict[str, Route] = {}
        registry.on_evict.append(self._node_lost)

    def link(self, node: Node) -> WorkerLink:
        link = self.links.get(node.node_id)
        if link is None:
            link = WorkerLink(node.node_id, node.address, self._on_batch, self._on_link_closed)
            self.links[node.node_id] = link
            link.start()
        return link

    def submit(self, work: worker_pb2.GenerationWork, session: Session) -> None:
        """Route one request; a refusal becomes its error event on the session."""
        try:
            node = pick_node(self.registry.routable(work.model), self.rng)
        except MeshError as exc:
            session.send([_error_event(work.request_id, exc.grpc_code, str(exc))])
            return
        node.in_flight += 1
        node.routed_requests += 1
        self.routes[work.request_id] = Route(session, node.node_id)
        session.request_ids.add(work.request_id)
        self.link(node).send(worker_pb2.ExecuteRequest(add=work))

    def cancel(self, request_id: str, reason: str) -> None:
        route = self.routes.get(request_id)
        if route is None:
            return
        link = self.links.get(route.node_id)
        if link is not None:
            link.send(worker_pb2.ExecuteRequest(cancel=worker_pb2.Cancel(request_id=request_id, reason=reason)))

    def close_session(self, session: Session) -> None:
        """The gateway went away: cancel everything it still had running."""
        for request_id in list(session.request_ids):
            self.cancel(request_id, "client")

    def _on_batch(self, node_id: str, batch: worker_pb2.EventBatch) -> None:
        by_session: dict[int, tuple[Session, list[worker_pb2.RequestEvent]]] = {}
        for event in batch.events:
            route = self.routes.get(event.request_id)
            if route is None:
                continue
            if event.finish_reason or event.HasField("error"):
                self._finish(event.request_id, route)
            by_session.setdefault(id(route.session), (route.session, []))[1].append(event)
        for session, events in by_session.values():
            session.send(events)

    def _finish(self, request_id: str, route: Route) -> None:
        del self.routes[request_id]
        route.session.request_ids.discard(request_id)
        node = self.registry.nodes.get(route.node_id)
        if node is not None:
            node.in_flight -= 1

    def _on_link_closed(self, node_id: str) -> None:
        """A broken execution stream means the node is gone."""
        self.registry.evict(node_id)

    def _node_lost(self, node: Node) -> None:
        """Fail the node's in-flight requests as retryable; drop its link."""
        link = self.links.pop(node.node_id, None)
        if link is not None:
            asyncio.get_running_loop().create_task(link.close())
        lost = [(rid, r) for rid, r in self.routes.items() if r.node_id == node.node_id]
        for request_id, route in lost:
            self._finish(request_id, route)
            route.session.send([_error_event(request_id, grpc.StatusCode.UNAVAILABLE,
                                             f"replica {node.node_id} was lost")])
        if lost:
            log.warning("node lost with requests in flight", extra={"node_id": node.node_id, "lost": len(lost)})


def _error_event(request_id: str, code: grpc.StatusCode, message: str) -> worker_pb2.RequestEvent:
    return worker_pb2.RequestEvent(
        request_id=request_id, error=worker_pb2.RequestError(code=code.value[0], message=message)
    )
