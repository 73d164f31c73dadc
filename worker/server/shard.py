"""Expert shard process (rank > 0 of an expert-parallel replica): load its experts, answer layer exchanges.

    python -m moemesh.worker.server.shard --model-dir D --rank 1 --world-size 2 [--placement P] --port 0
        [--device cpu] [--dtype auto] [--scheduler H:P --replica-group G] [--ready-fd N]

It reads from the checkpoint only the routed experts the placement gives its
rank, picks their backend for its own device and dtype, and serves
`ExpertShard` (see protos/moemesh/v1/experts.proto): rank 0 opens one
Exchange stream and sends it, per MoE layer, the rows routed to its experts.
Messages are answered in order: small ones (a decode step's) on the event loop, larger
ones on one compute thread beside it.

With `--scheduler`, it registers as rank r of its replica group and
heartbeats like a worker (serving no model: the scheduler never routes to
it), so that the replica is routable only while every rank is there, and the
loss of this shard fails the replica's requests over at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import pydantic
import torch
from pydantic_settings import SettingsConfigDict

from moemesh.services.core import tensors
from moemesh.services.core.auth import ClusterAuthInterceptor, bearer_metadata
from moemesh.services.core.config import ServiceConfig
from moemesh.services.core.entrypoint import service_main
from moemesh.services.core.errors import InvalidRequest
from moemesh.services.core.processes import release_free_heap
from moemesh.services.core.server import GrpcServer, announce_ready, stop_event_on_signals
from moemesh.services.core.tls import aio_channel, server_credentials
from moemesh.v1 import common_pb2, experts_pb2, experts_pb2_grpc, scheduler_pb2
from moemesh.worker.models.checkpoint import LoadRecord, open_checkpoint
from moemesh.worker.models.expert_parallel import ExpertShardModel
from moemesh.worker.models.placement import ExpertPlacement
from moemesh.worker.models.registry import build_expert_shard, model_class, resolve_dtype
from moemesh.worker.server.config import DEVICE_PATTERN, require_device
from moemesh.worker.server.membership import Membership

log = logging.getLogger("moemesh.shard")

EXPERT_SHARD_SERVICE = experts_pb2.DESCRIPTOR.services_by_name["ExpertShard"].full_name
# Method -> the certificate roles that may call it (with mutual TLS): rank 0 is a worker.
EXPERT_SHARD_ACCESS: dict[str, frozenset[str]] = {
    "Exchange": frozenset({"worker"}),
    "Describe": frozenset({"worker", "operator"}),
}


class ShardConfig(ServiceConfig):
    """Everything an expert shard process needs; built once in ``main()``."""

    model_config = SettingsConfigDict(env_prefix="MOEMESH_SHARD_")

    model_dir: pydantic.DirectoryPath = pydantic.Field(description="Hugging Face checkpoint directory (rank 0's)")
    model_id: str | None = pydantic.Field(default=None, description="model id; default: the directory's name")
    rank: int = pydantic.Field(ge=1, description="this shard's rank in its replica (1..world_size-1)")
    world_size: int = pydantic.Field(ge=2, description="ranks in the replica, rank 0 included")
    placement: str | None = pydantic.Field(
        default=None, description='expert -> rank map: "contiguous" (default), "0,0,1,1", or JSON '
                                  '{"experts": [...], "layers": {"3": [...]}}; the same on every rank')
    host: str = pydantic.Field(default="127.0.0.1", description="address the shard's gRPC server binds")
    port: int = pydantic.Field(default=0, ge=0, le=65535, description="gRPC port (0: a free one)")
    device: str = pydantic.Field(default="cpu", pattern=DEVICE_PATTERN,
                                 description='"cpu" or "cuda[:N]": where this shard\'s experts run')
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = pydantic.Field(
        default="auto", description="the experts' dtype; auto: bfloat16 on CUDA, float32 on the CPU")
    pack_weights: bool = pydantic.Field(default=True, description="on the CPU, lay expert weights out for the kernels")
    num_threads: int = pydantic.Field(default=0, ge=0, description="torch threads; 0: torch's default")
    cluster_token: pydantic.SecretStr | None = pydantic.Field(
        default=None, min_length=8, description="the mesh's shared secret, required of every caller and presented "
                                                "to the scheduler (give it by environment, "
                                                "MOEMESH_SHARD_CLUSTER_TOKEN, or a secret file)")
    scheduler: str | None = pydantic.Field(
        default=None, min_length=3, description="scheduler host:port to register with (as rank `rank` of "
                                                "`replica_group`); unset: not registered")
    replica_group: str | None = pydantic.Field(
        default=None, min_length=1, description="the replica group id, the same as rank 0's --replica-group; "
                                                "required with --scheduler")
    node_id: str | None = pydantic.Field(default=None, description="unique node id; default hostname-pid-random")
    advertise_address: str | None = pydantic.Field(
        default=None, description="this shard's address as others should dial it; default host:bound port")
    log_level: str = pydantic.Field(default="info", description="log level")

    @pydantic.model_validator(mode="after")
    def _rank_in_world(self) -> ShardConfig:
        if self.rank >= self.world_size:
            raise ValueError(f"rank ({self.rank}) must be below world_size ({self.world_size})")
        if self.scheduler and not self.replica_group:
            raise ValueError("replica_group: required with scheduler (rank 0's --replica-group)")
        return self


def parse_placement(ckpt, text: str | None, world_size: int) -> ExpertPlacement:
    """The placement `text` gives the checkpoint's experts (see worker.models.placement)."""
    args = model_class(ckpt.architecture).args_class.from_config(ckpt.config)
    return ExpertPlacement.parse(text, args.num_experts, world_size)


def require_placement(service: str, ckpt, text: str | None, world_size: int) -> ExpertPlacement:
    """The placement `text` gives the checkpoint's experts, or stop the process (status 2, one line naming
    ep_placement): a map that does not fit the model stops a rank at its start, not in a traceback from its load."""
    try:
        return parse_placement(ckpt, text, world_size)
    except ValueError as exc:
        print(f"moemesh-{service}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def held_experts(placement: ExpertPlacement, rank: int) -> list[int]:
    """The experts `rank` holds in the placement's default map (what a rank registers)."""
    return [expert for expert, owner in enumerate(placement.owners) if owner == rank]


# Messages of at most this many token rows (every decode step's, small prefill chunks') are answered on the event
# loop itself: a few milliseconds of compute at most, and two thread hand-offs fewer per layer (0.3-0.5 ms on a
# busy 2-core machine). Larger ones go to the compute thread, so that the loop keeps answering health checks and
# heartbeats through a long prefill chunk. With more than one torch thread the two threads each get an OpenMP
# team; messages are answered one at a time, so the teams never run at once, and the idle one sleeps.
INLINE_ROWS = 64


class ExpertShardServicer(experts_pb2_grpc.ExpertShardServicer):
    """Converts LayerWork to tensors at the edge and answers with the shard's partial sums, in order."""

    def __init__(self, shard: ExpertShardModel, info: experts_pb2.ShardInfo) -> None:
        self.shard, self.info = shard, info
        # One thread: a stream's messages are answered in order, and the loop stays free for health checks.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="expert-shard")

    async def Exchange(self, request_iterator, context):
        loop = asyncio.get_running_loop()
        async for work in request_iterator:
            if work.hidden.shape and work.hidden.shape[0] <= INLINE_ROWS:
                yield self.answer(work)
            else:
                yield await loop.run_in_executor(self.executor, self.answer, work)

    def answer(self, work: experts_pb2.LayerWork) -> experts_pb2.LayerResult:
        """One layer's partial sums (on the event loop for a small message, else on the compute thread)."""
        started = time.perf_counter()
        hidden = _decode("hidden", work.hidden)
        partial = self.shard.compute(work.layer, hidden, _decode("expert_ids", work.expert_ids, host=True),
                                     _decode("weights", work.weights, host=True))
        result = experts_pb2.LayerResult(step=work.step, layer=work.layer, sequence=work.sequence)
        tensors.fill_pb(result.partial, partial)
        result.compute_seconds = time.perf_counter() - started
        return result

    async def Describe(self, request, context) -> experts_pb2.ShardInfo:
        info = experts_pb2.ShardInfo()
        info.CopyFrom(self.info)
        info.resident_bytes = resident_bytes()
        return info


def _decode(field: str, message: common_pb2.Tensor, host: bool = False) -> torch.Tensor | np.ndarray:
    """A LayerWork tensor, read only (the shard never writes its inputs): a tensor, or with `host` a numpy array
    (the ids and weights, which the shard only reads on the host); InvalidRequest naming `field` if malformed."""
    try:
        return tensors.array_from_pb(message) if host else tensors.from_pb(message, copy=False)
    except ValueError as exc:
        raise InvalidRequest(field, str(exc)) from None


def resident_bytes() -> int:
    """This process's resident set size, bytes (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def load_shard(config: ShardConfig, ckpt, placement: ExpertPlacement) -> tuple[ExpertShardModel,
                                                                               experts_pb2.ShardInfo]:
    """Load this rank's experts of `ckpt` (config.model_dir, opened) under `placement` and describe them."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    dtype = resolve_dtype(config.dtype, config.device)
    record = LoadRecord()
    shard = build_expert_shard(ckpt, placement, config.rank, dtype, config.device, config.pack_weights, record=record)
    release_free_heap()  # the load's temporaries
    info = experts_pb2.ShardInfo(
        model_id=ckpt.model_id, revision=ckpt.revision, rank=config.rank, world_size=config.world_size,
        placement=placement.to_json(), device=str(shard.device), dtype=str(dtype).removeprefix("torch."),
        loaded_tensors=sorted(record.names), loaded_bytes=record.bytes_read)
    return shard, info


def registration(config: ShardConfig, info: experts_pb2.ShardInfo, placement: ExpertPlacement, node_id: str,
                 address: str) -> scheduler_pb2.RegisterRequest:
    """What this shard registers: its group, rank, world size, placement, experts and device; no model."""
    return scheduler_pb2.RegisterRequest(
        node_id=node_id, address=config.advertise_address or address, replica_group=config.replica_group,
        rank=config.rank, world_size=config.world_size, device=info.device, placement=info.placement,
        held_experts=held_experts(placement, config.rank))


async def serve(config: ShardConfig, ready_fd: int | None) -> None:
    require_device("shard", config.device)
    ckpt = open_checkpoint(config.model_dir, config.model_id)
    placement = require_placement("shard", ckpt, config.placement, config.world_size)
    stop = stop_event_on_signals()
    credentials = server_credentials(config.tls_dir, "worker") if config.tls_dir else None
    token = config.cluster_token.get_secret_value() if config.cluster_token else None
    auth = ClusterAuthInterceptor(token, {EXPERT_SHARD_SERVICE: EXPERT_SHARD_ACCESS},
                                  mutual_tls=config.tls_dir is not None)
    server = GrpcServer(config.host, config.port, credentials=credentials, interceptors=[auth], grace=1.0)
    shard, info = await asyncio.to_thread(load_shard, config, ckpt, placement)
    servicer = ExpertShardServicer(shard, info)
    server.add(experts_pb2_grpc.add_ExpertShardServicer_to_server, servicer, EXPERT_SHARD_SERVICE)
    await server.start()
    await server.set_serving(True)
    node_id = config.node_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    membership = None
    if config.scheduler:
        request = registration(config, info, shard.placement, node_id, server.address)
        channel = aio_channel(config.scheduler, config.tls_dir, "worker")
        membership = Membership(channel, request, lambda: scheduler_pb2.NodeLoad(), bearer_metadata(token))
        membership.start()
        await membership.registered.wait()
    announce_ready(ready_fd, service="expert-shard", address=server.address, rank=config.rank,
                   world_size=config.world_size, node_id=node_id, replica_group=config.replica_group,
                   experts={layer: list(module.held_experts) for layer, module in shard.layers.items()},
                   loaded_bytes=info.loaded_bytes, resident_bytes=resident_bytes())
    await stop.wait()
    if membership is not None:  # leave first: the replica stops taking requests before this shard goes
        await membership.stop(deregister=True)
        await channel.close()
    await server.stop()
    servicer.executor.shutdown(wait=False, cancel_futures=True)


def main(argv: list[str] | None = None) -> int:
    return service_main(argv, service="shard", description=__doc__, config_cls=ShardConfig, serve=serve)


if __name__ == "__main__":
    sys.exit(main())
