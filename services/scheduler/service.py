"""The scheduler's gRPC servicer: converts protobuf at the edge, calls the registry and dispatcher.

Callers are checked before any method here runs (`services/core/auth.py`, installed by `main.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from moemesh.services.core.errors import InvalidRequest, error_from_rpc
from moemesh.services.scheduler.dispatcher import Dispatcher, Session
from moemesh.services.scheduler.embed_batcher import EmbedBatcher
from moemesh.services.scheduler.registry import Load, Node, Registry, ServedModel
from moemesh.services.scheduler.router import pick_node
from moemesh.v1 import models_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

_KINDS = {models_pb2.MODEL_KIND_GENERATION: "generation", models_pb2.MODEL_KIND_EMBEDDING: "embedding"}
_KIND_NUMBERS = {v: k for k, v in _KINDS.items()}


def served_model_from_pb(pb: models_pb2.ModelInfo) -> ServedModel:
    return ServedModel(
        model_id=pb.id, revision=pb.revision, kind=_KINDS.get(pb.kind, "generation"),
        architecture=pb.architecture, max_context_tokens=pb.max_context_tokens,
        max_output_tokens=pb.max_output_tokens, max_batch_inputs=pb.max_batch_inputs, dimensions=pb.dimensions,
    )


def served_model_to_pb(model: ServedModel, ready_replicas: int) -> models_pb2.ModelInfo:
    return models_pb2.ModelInfo(
        id=model.model_id, revision=model.revision, kind=_KIND_NUMBERS[model.kind],
        architecture=model.architecture, max_context_tokens=model.max_context_tokens,
        max_output_tokens=model.max_output_tokens, max_batch_inputs=model.max_batch_inputs,
        dimensions=model.dimensions, ready_replicas=ready_replicas,
    )


def node_from_pb(pb: scheduler_pb2.RegisterRequest) -> Node:
    return Node(
        node_id=pb.node_id, address=pb.address, models=tuple(served_model_from_pb(m) for m in pb.models),
        replica_group=pb.replica_group or pb.node_id, rank=pb.rank, world_size=pb.world_size or 1,
        device=pb.device, placement=pb.placement, held_experts=tuple(pb.held_experts),
        max_num_seqs=pb.capacity.max_num_seqs or 1,
        num_kv_blocks=pb.capacity.num_kv_blocks, block_size=pb.capacity.block_size or 16,
        load=Load(free_kv_blocks=pb.capacity.num_kv_blocks),  # all free until the first heartbeat says otherwise
    )


def load_from_pb(pb: scheduler_pb2.NodeLoad) -> Load:
    return Load(
        running_seqs=pb.running_seqs, waiting_seqs=pb.waiting_seqs, free_kv_blocks=pb.free_kv_blocks,
        steps_per_second=pb.steps_per_second, seconds_since_progress=pb.seconds_since_progress,
        draining=pb.draining, expert_load=tuple(pb.expert_load),
    )


MAX_WORLD_SIZE = 1024  # ranks in one replica group, at most


def check_registration(pb: scheduler_pb2.RegisterRequest) -> None:
    """InvalidRequest naming the field a registration gets wrong."""
    if not pb.node_id or not pb.address:
        raise InvalidRequest("node_id" if not pb.node_id else "address", "is required")
    world_size = pb.world_size or 1
    if not 1 <= world_size <= MAX_WORLD_SIZE:
        raise InvalidRequest("world_size", f"must be 1..{MAX_WORLD_SIZE}, got {pb.world_size}")
    if not 0 <= pb.rank < world_size:
        raise InvalidRequest("rank", f"must be 0..{world_size - 1} (world_size {world_size}), got {pb.rank}")
    if pb.rank > 0 and len(pb.models):
        raise InvalidRequest("models", "an expert shard (rank > 0) serves no model: requests go to rank 0")
    if world_size > 1 and not pb.replica_group:
        raise InvalidRequest("replica_group", "is required with world_size > 1 (it ties the ranks together)")


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    """Registration, heartbeats, dispatch, embeddings and the catalogue."""

    def __init__(self, registry: Registry, dispatcher: Dispatcher, embed_max_inputs: int = 256,
                 embed_max_delay: float = 0.002) -> None:
        self.registry = registry
        self.dispatcher = dispatcher
        self._embed_stubs: dict[str, worker_pb2_grpc.WorkerStub] = {}
        self.embed_batcher = EmbedBatcher(self._embed_on_a_replica, embed_max_inputs, embed_max_delay)

    async def Register(self, request, context):
        check_registration(request)
        node = self.registry.register(node_from_pb(request))
        if node.rank == 0:  # an expert shard takes no requests: only rank 0 gets an execution stream
            self.dispatcher.link(node)
        self.dispatcher.pump()  # queued requests may fit on the newcomer (or on the replica it completes)
        log.info("node registered", extra={"node_id": node.node_id, "address": node.address,
                                           "replica_group": node.replica_group, "rank": node.rank,
                                           "world_size": node.world_size})
        return scheduler_pb2.RegisterResponse(
            lease_id=node.lease_id,
            heartbeat_interval=self.registry.heartbeat_interval,
            max_missed_heartbeats=self.registry.max_missed,
        )

    async def Heartbeat(self, request_iterator, context) -> AsyncIterator[scheduler_pb2.HeartbeatReply]:
        held: tuple[str, str] | None = None  # the (node, lease) this stream proved it holds
        try:
            async for beat in request_iterator:
                if held not in (None, (beat.node_id, beat.lease_id)) or not self.registry.heartbeat(
                        beat.node_id, beat.lease_id, load_from_pb(beat.load)):
                    yield scheduler_pb2.HeartbeatReply(command=scheduler_pb2.HeartbeatReply.COMMAND_REREGISTER)
                    return
                held = (beat.node_id, beat.lease_id)
        finally:
            # A broken or closed stream evicts its node at once, but only under the lease it held: a stream
            # with a wrong lease, or an old stream of a node that has since re-registered, changes nothing.
            if held is not None:
                self.registry.deregister(*held)

    async def Deregister(self, request, context):
        self.registry.deregister(request.node_id, request.lease_id)
        return scheduler_pb2.DeregisterResponse()

    async def Dispatch(self, request_iterator, context) -> AsyncIterator[worker_pb2.EventBatch]:
        session = Session()
        reader = asyncio.create_task(self._read_dispatch(request_iterator, session))
        try:
            while True:
                batch = await session.outbox.get()
                while not session.outbox.empty():  # a slow gateway gets fewer, fuller messages
                    batch.events.extend(session.outbox.get_nowait().events)
                yield batch
        finally:
            reader.cancel()
            self.dispatcher.close_session(session)

    async def _read_dispatch(self, request_iterator, session: Session) -> None:
        async for message in request_iterator:
            if message.WhichOneof("kind") == "add":
                self.dispatcher.submit(message.add, session)
            else:
                self.dispatcher.cancel(message.cancel.request_id, message.cancel.reason or "client")

    async def Embed(self, request, context):
        return await self.embed_batcher.embed(request)

    async def _embed_on_a_replica(self, request: worker_pb2.EmbedWork) -> worker_pb2.EmbedResult:
        """One worker call for a (possibly merged) embedding batch."""
        node = pick_node(self.registry.routable(request.model), self.dispatcher.rng)
        link = self.dispatcher.link(node)
        stub = self._embed_stubs.get(node.node_id)
        if stub is None:
            stub = worker_pb2_grpc.WorkerStub(link.channel)
            self._embed_stubs[node.node_id] = stub
        try:
            return await stub.Embed(request, timeout=60.0, metadata=link.metadata)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None

    async def ListModels(self, request, context):
        catalogue = self.registry.catalogue()
        return models_pb2.ListModelsResponse(
            models=[served_model_to_pb(model, count) for model, count in catalogue.values()]
        )

    async def ListNodes(self, request, context):
        now = self.registry.clock()
        return scheduler_pb2.ListNodesResponse(nodes=[
            scheduler_pb2.NodeInfo(
                node_id=n.node_id, address=n.address, state=n.state.value, replica_group=n.replica_group,
                rank=n.rank, world_size=n.world_size, model_ids=[m.model_id for m in n.models],
                load=scheduler_pb2.NodeLoad(running_seqs=n.load.running_seqs, waiting_seqs=n.load.waiting_seqs,
                                            free_kv_blocks=n.load.free_kv_blocks,
                                            steps_per_second=n.load.steps_per_second,
                                            seconds_since_progress=n.load.seconds_since_progress,
                                            expert_load=n.load.expert_load, draining=n.load.draining),
                heartbeat_age=now - n.last_heartbeat,
                routed_requests=n.routed_requests,
                in_flight=n.in_flight,
                device=n.device,
                placement=n.placement,
                held_experts=n.held_experts,
                routable=self.registry.is_routable(n),
            )
            for n in self.registry.nodes.values()
        ])


