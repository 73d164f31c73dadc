"""Remote experts: rank 0 of an expert-parallel replica runs its MoE layers' other experts on shard processes.

For each MoE layer of a forward, `RemoteExperts` sends each shard (rank > 0),
all at once, only the hidden rows of the tokens routed to that shard's
experts, with their expert ids and routing weights (a shard with no rows gets
no message); computes rank 0's own experts on its local backend meanwhile;
then waits for the shards' partial sums and adds them into the token rows.

Each shard is reached over ONE persistent bidirectional `ExpertShard.Exchange`
stream (`ShardLink`), opened when the replica starts and used for every layer
of every step. The forward runs on the engine thread, in plain synchronous
torch code, so the links use gRPC's synchronous API: a request queue feeds
the stream's request iterator, and the forward reads each answer from the
response iterator, a watchdog thread cancelling the read if its deadline
passes. A shard that does not answer within `exchange_timeout` seconds, or
whose stream breaks, raises `ExpertShardFailed` and breaks the exchange for
good: the replica must then be failed (its requests fail over); nothing
hangs.

Tensors travel as raw bytes with dtype and shape (`services.core.tensors`);
expert ids on the wire are global (0..E-1), and each rank maps them to the
rows of its own stacked weights (`run_held`).
"""

from __future__ import annotations

import logging
import pathlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError

from moemesh.services.core import tensors
from moemesh.services.core.auth import bearer_metadata
from moemesh.services.core.errors import Unavailable
from moemesh.services.core.tls import channel_credentials
from moemesh.v1 import common_pb2, experts_pb2, experts_pb2_grpc
from moemesh.worker.ops import native
from moemesh.worker.ops.backends import Target
from moemesh.worker.ops.experts import ExpertsBackend

log = logging.getLogger(__name__)

# The largest message either end accepts.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# A shard's share of a layer goes in messages of at most this many bytes of hidden states, each answered in turn
# on the same stream: a step's share can exceed MAX_MESSAGE_BYTES (an 8,192-token budget of a 4,096-wide model in
# bfloat16 is 64 MiB), and the answers are as large.
MESSAGE_PART_BYTES = 16 * 1024 * 1024
_END = object()  # ends a link's request iterator
EXCHANGE_METHOD = f"/{experts_pb2.DESCRIPTOR.services_by_name['ExpertShard'].full_name}/Exchange"


class ExpertShardFailed(Unavailable):
    """An expert shard stopped answering or its stream broke: the replica cannot compute its layers any more."""


class ExpertShardTimeout(ExpertShardFailed):
    """An expert shard did not answer a layer exchange within the exchange timeout (it is stalled or overloaded)."""


@dataclass(frozen=True)
class ExpertParallelConfig:
    """How rank 0 reaches its shards: their addresses in rank order (rank 1 first) and the exchange's limits."""

    placement: object  # the replica's ExpertPlacement (worker.models.placement)
    shards: tuple[str, ...]  # host:port of ranks 1..N-1
    exchange_timeout: float = 10.0  # seconds one layer exchange may take before the shard counts as stalled
    connect_timeout: float = 30.0  # seconds to wait for every shard to answer Describe at start
    cluster_token: str | None = None  # presented to the shards (authorization: Bearer ...)
    tls_dir: pathlib.Path | None = None  # mutual TLS as role "worker"; None: plaintext

    def __post_init__(self) -> None:
        if len(self.shards) != self.placement.world_size - 1:
            raise ValueError(f"ep_shards: {len(self.shards)} shard addresses for a world size of "
                             f"{self.placement.world_size} (one per rank > 0)")
        if self.exchange_timeout <= 0 or self.connect_timeout <= 0:
            raise ValueError("ep_exchange_timeout: timeouts must be positive")


@dataclass
class ExchangeStats:
    """What the exchanges of a replica cost: for the benchmark and the metrics."""

    steps: int = 0  # forwards that reached a layer with remote experts
    exchanges: int = 0  # layer exchanges that sent to at least one shard
    messages: int = 0  # LayerWork messages sent
    bytes_sent: int = 0  # serialized LayerWork bytes
    bytes_received: int = 0  # serialized LayerResult bytes
    rows_sent: int = 0  # token rows sent (each token once per shard it has a choice on)
    choices_sent: int = 0  # (token, expert) choices sent
    exchange_seconds: float = 0.0  # summed over exchanges: first send to last answer combined
    wait_seconds: float = 0.0  # of which rank 0 waited for shards after its own experts were done
    shard_compute_seconds: float = 0.0  # the shards' own compute time, as they reported it
    durations: list[float] = field(default_factory=list)  # each exchange's seconds (the last 10,000)
    # Each exchange's seconds beyond the longest compute in it (a shard's own work on its message: decode,
    # compute, encode, as it reported it; or rank 0's own experts, computed meanwhile): what the exchange adds to
    # the compute, to set against a bare round trip of the same bytes.
    overheads: list[float] = field(default_factory=list)
    shard_seconds: list[float] = field(default_factory=list)  # each exchange's longest compute a shard reported
    # Each exchange's number of shards messaged: its reference is a round trip to as many peers at once.
    peers: list[int] = field(default_factory=list)

    def record(self, seconds: float, compute_seconds: float = 0.0, shard_seconds: float = 0.0, peers: int = 1) -> None:
        self.exchanges += 1
        self.exchange_seconds += seconds
        self.durations.append(seconds)
        self.overheads.append(max(seconds - compute_seconds, 0.0))
        self.shard_seconds.append(shard_seconds)
        self.peers.append(peers)
        if len(self.durations) > 10_000:
            for series in (self.durations, self.overheads, self.shard_seconds, self.peers):
                del series[:5_000]


@dataclass(frozen=True)
class Routed:
    """One rank's share of a layer's routing, on the host: which token rows, and their choices on that rank."""

    rows: np.ndarray  # [n] int64 token indices
    ids: np.ndarray  # [n, k'] int32 global expert ids, each row's valid ones first (in router order), then -1
    weights: np.ndarray  # [n, k'] float32 routing weights, 0 on padding
    choices: int  # valid (id >= 0) choices in all

    def rows_on(self, device: torch.device) -> torch.Tensor:
        return on_device(self.rows, device)

    def part(self, start: int, stop: int) -> Routed:
        """Rows [start, stop) of this share."""
        ids = self.ids[start:stop]
        return Routed(self.rows[start:stop], ids, self.weights[start:stop], int(np.count_nonzero(ids >= 0)))


def on_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on `device`: shares its memory on the CPU, one copy elsewhere."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor if device.type == "cpu" else tensor.to(device, non_blocking=True)


def split_by_rank(owner_of: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  wanted: torch.Tensor | None, ranks: int) -> list[Routed | None]:
    """A layer's routing split by the rank holding each chosen expert: rank r's share (None: no choice there).

    owner_of [E] (int64, CPU) is each expert's rank (-1: computed nowhere);
    with `wanted` [E] (uint8), a choice of an expert at 0 is computed nowhere.
    One native call on the host where the kernels are built (a few
    microseconds for every rank of a decode step, where numpy took tens of
    calls per rank, several times slower with the caches cold from the
    layer's other work), else `route_to_rank` per rank. Device tensors cost
    one copy to the host. The shares view the native call's work buffers:
    use them before this thread splits again.
    """
    ids = topk_ids.detach().cpu()
    weights = topk_weights.detach().to(dtype=torch.float32).cpu()
    if ids.dtype == torch.int64 and native.load_kernels().available:
        rows, all_ids, all_weights, counts = native.split_routing(ids, weights, owner_of, wanted, ranks)
        T, k = ids.shape
        shares: list[Routed | None] = []
        for r in range(ranks):
            n, width, choices = counts[3 * r: 3 * r + 3]
            if n:
                at = r * T * k
                shares.append(Routed(rows[r * T: r * T + n], all_ids[at: at + n * width].reshape(n, width),
                                     all_weights[at: at + n * width].reshape(n, width), choices))
            else:
                shares.append(None)
        return shares
    host_ids, host_weights = ids.numpy(), weights.numpy()
    owners = owner_of.numpy()[host_ids]  # [T, k] rank of each choice
    if wanted is not None:
        owners = np.where(wanted.numpy()[host_ids] != 0, owners, -1)
    return [route_to_rank(owners, host_ids, host_weights, rank) for rank in range(ranks)]


# Up to this many (token, choice) pairs, routing loops in Python: a few microseconds, where each numpy call costs
# about as much as the whole loop (bench/ep_bench.py's decode steps at 1 to 4 sequences).
_PYTHON_ROUTING_CHOICES = 32


def route_to_rank(owners: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray, rank: int) -> Routed | None:
    """The rows of the tokens with a choice on `rank`, and those choices; None when there are none.

    owners [T, k] is the rank of each choice (-1: computed nowhere). Host
    arrays throughout: a decode step's routing is a few dozen numbers, which
    a dozen small tensor operations handled in over a hundred microseconds.
    """
    if owners.size <= _PYTHON_ROUTING_CHOICES:
        return _route_small(owners, topk_ids, topk_weights, rank)
    T, k = owners.shape
    chosen = np.flatnonzero(owners == rank)  # flat (token, choice) positions: by token, router order within one
    m = chosen.size
    if m == 0:
        return None
    if m == T * k:  # every choice is on `rank`
        return Routed(np.arange(T), topk_ids.astype(np.int32), topk_weights.astype(np.float32), m)
    token_of = chosen // k
    first = np.empty(m, dtype=bool)  # the first chosen pair of each token
    first[0] = True
    np.not_equal(token_of[1:], token_of[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    rows, counts = token_of[starts], np.diff(starts, append=m)
    n, width = rows.size, int(counts.max())
    ids_of, weights_of = topk_ids.ravel()[chosen], topk_weights.ravel()[chosen]
    if n * width == m:  # every row has the same count: no padding
        return Routed(rows, ids_of.reshape(n, width).astype(np.int32),
                      weights_of.reshape(n, width).astype(np.float32), m)
    at = (np.repeat(np.arange(n), counts), np.arange(m) - np.repeat(starts, counts))  # (row, column) of each pair
    ids = np.full((n, width), -1, dtype=np.int32)
    ids[at] = ids_of
    weights = np.zeros((n, width), dtype=np.float32)
    weights[at] = weights_of
    return Routed(rows, ids, weights, m)


def _route_small(owners: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray, rank: int) -> Routed | None:
    """`route_to_rank` for a few choices, in plain Python."""
    rows, choices = [], []
    for token, ranks in enumerate(owners.tolist()):
        mine = [j for j, owner in enumerate(ranks) if owner == rank]
        if mine:
            rows.append(token)
            choices.append(mine)
    if not rows:
        return None
    width = max(len(mine) for mine in choices)
    all_ids, all_weights = topk_ids.tolist(), topk_weights.tolist()
    ids = [[all_ids[t][j] for j in mine] + [-1] * (width - len(mine)) for t, mine in zip(rows, choices)]
    weights = [[all_weights[t][j] for j in mine] + [0.0] * (width - len(mine)) for t, mine in zip(rows, choices)]
    return Routed(np.array(rows, dtype=np.int64), np.array(ids, dtype=np.int32), np.array(weights, dtype=np.float32),
                  sum(map(len, choices)))


def held_rows(num_experts: int, held_experts: Sequence[int]) -> np.ndarray:
    """[E] the row of each held expert in its rank's stacked weights (held_experts sorted), -1 for the others."""
    rows = np.full(num_experts, -1, dtype=np.int64)
    rows[list(held_experts)] = np.arange(len(held_experts))
    return rows


def held_choices(rows_of: np.ndarray, ids: np.ndarray) -> np.ndarray | None:
    """ids [n, k'] (global expert ids, each row's valid ones first, -1 after) as rows of the held weights: [n, k']
    int64, -1 kept. None when they are not for these weights: an id out of range or not held, a row without a
    first choice, a valid choice after a -1. One native call where the kernels are built: a shard's checks and
    mapping were about ten numpy calls, 67 µs a decode message with the caches cold from the layer's other work,
    now 43 (bench/ep_bench.py's checkpoint, 2 ranks)."""
    if ids.dtype == np.int32 and ids.ndim == 2 and native.load_kernels().available:
        return native.map_held(ids, rows_of)
    ids = ids.astype(np.int64, copy=False)
    valid = ids >= 0
    if ids.ndim != 2 or ids.shape[1] == 0 or (ids < -1).any() or not valid[:, 0].all() \
            or (valid[:, 1:] > valid[:, :-1]).any() or (ids >= rows_of.shape[0]).any():
        return None
    rows = np.where(valid, rows_of[np.maximum(ids, 0)], -1)
    return None if (rows[valid] < 0).any() else rows


def run_held(backend: ExpertsBackend, rows_of: np.ndarray, x: torch.Tensor, ids: np.ndarray,
             weights: np.ndarray) -> torch.Tensor:
    """The weighted sum over each row's choices among the held experts: x [n, H] -> [n, H].

    rows_of [E] maps a global expert id to its row of the held weights.
    ids [n, k'] (host) holds each row's valid choices first, then -1, which
    the backend skips: every row goes in one call, so each held expert's
    weights are read once. (One call per choice count read them once per
    count: at a decode step, where the experts are bound by reading their
    weights, a shard's message at 32 sequences took 2.85 ms instead of 1.99
    in bench/ep_bench.py.) ValueError if an id is not held here.
    """
    local = held_choices(rows_of, ids)
    if local is None:
        raise ValueError("the choices name experts these weights do not hold, or are not valid first")
    return run_rows(backend, x, local, weights)


def run_rows(backend: ExpertsBackend, x: torch.Tensor, rows: np.ndarray, weights: np.ndarray) -> torch.Tensor:
    """`run_held` with the choices already given as rows of the held weights (`held_choices`)."""
    return backend(x, on_device(rows, x.device), on_device(weights, x.device))


class Watchdog:
    """Cancels the stream being read when its deadline passes: the timeout of a blocking read of a gRPC stream.

    The forward reads each answer straight from the response iterator (no
    hand-off through another thread: a wake-up less per answer on a busy
    machine). Arming costs a lock and two assignments; the watchdog thread
    wakes only when a deadline it knows of passes, or when it was idle.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._armed: tuple[ShardLink, float] | None = None  # the link being read, and its deadline
        self._idle = True  # waiting for an arm, with no deadline to wake at
        self._stopped = False
        self._thread = threading.Thread(target=self._watch, name="expert-exchange-watchdog", daemon=True)
        self._thread.start()

    def arm(self, link: ShardLink, deadline: float) -> None:
        with self._condition:
            self._armed = (link, deadline)
            if self._idle:
                self._condition.notify()

    def disarm(self) -> None:
        with self._condition:
            self._armed = None

    def stop(self) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify()
        self._thread.join(timeout=5.0)

    def _watch(self) -> None:
        with self._condition:
            while not self._stopped:
                if self._armed is None:
                    self._idle = True
                    self._condition.wait()
                    continue
                link, deadline = self._armed
                left = deadline - time.monotonic()
                if left <= 0:
                    link.expire()
                    self._armed = None
                    continue
                self._idle = False
                self._condition.wait(left)  # by then this read is long done, or it is late


class ShardLink:
    """One persistent Exchange stream to one shard: LayerWork through a request queue, answers read in place."""

    def __init__(self, rank: int, address: str, channel: grpc.Channel, metadata: Sequence[tuple[str, str]],
                 watchdog: Watchdog) -> None:
        self.rank, self.address = rank, address
        self._channel, self._watchdog = channel, watchdog
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        # Messages travel as the bytes `send` serialized (its size is their length: no second encoding for the
        # statistics, none in gRPC's sending thread); answers arrive as bytes, parsed in `receive`.
        exchange = channel.stream_stream(EXCHANGE_METHOD, request_serializer=None, response_deserializer=None)
        self._call = exchange(iter(self._requests.get, _END), metadata=tuple(metadata))
        self._sequence = 0
        self._expired = False

    def __str__(self) -> str:
        return f"expert shard rank {self.rank} at {self.address}"

    @property
    def messages(self) -> int:
        """LayerWork messages sent on this stream so far."""
        return self._sequence

    def send(
        self, step: int, layer: int, hidden: torch.Tensor, ids: np.ndarray, weights: np.ndarray
    ) -> tuple[int, int]:
        """Queue one LayerWork; returns its sequence number and serialized size."""
        self._sequence += 1
        work = experts_pb2.LayerWork(step=step, layer=layer, sequence=self._sequence)
        tensors.fill_pb(work.hidden, hidden)
        tensors.fill_pb(work.expert_ids, ids)
        tensors.fill_pb(work.weights, weights)
        payload = work.SerializeToString()
        self._requests.put(payload)
        return self._sequence, len(payload)

    def receive(self, sequence: int, layer: int, deadline: float,
                timeout: float) -> tuple[experts_pb2.LayerResult, int]:
        """The answer to LayerWork `sequence` and its serialized size, waiting until `deadline` (time.monotonic());
        raises ExpertShardFailed."""
        self._watchdog.arm(self, deadline)
        try:
            payload = next(self._call)
        except StopIteration:
            raise ExpertShardFailed(f"{self} closed its stream") from None
        except grpc.RpcError as exc:
            if self._expired:
                raise ExpertShardTimeout(f"{self} did not answer layer {layer} within {timeout:g} s") from None
            raise ExpertShardFailed(f"{self}: stream broke: {exc.code().name}: {exc.details()}") from None
        finally:
            self._watchdog.disarm()
        try:
            answer = experts_pb2.LayerResult.FromString(payload)
        except DecodeError:
            raise ExpertShardFailed(f"{self} answered layer {layer} with bytes that are not a LayerResult") from None
        if answer.sequence != sequence or answer.layer != layer:
            raise ExpertShardFailed(f"{self} answered message {answer.sequence} (layer {answer.layer}), "
                                    f"expected {sequence} (layer {layer})")
        return answer, len(payload)

    def expire(self) -> None:
        """The deadline of the read in progress passed: end the stream, so that the read raises."""
        self._expired = True
        self._call.cancel()

    def close(self) -> None:
        """End the stream (the shard sees the end of its requests) and the channel."""
        self._requests.put(_END)
        self._call.cancel()
        self._channel.close()


class ExpertExchange:
    """Rank 0's links to every shard of its replica, and the one exchange per MoE layer over them.

    Open with `connect` (checks each shard: same checkpoint revision, rank,
    world size and placement), hand to `build_model(..., expert_parallel=)`,
    `close` when the replica stops. After any shard failure the exchange is
    broken: every later forward raises at once with the first failure.
    """

    def __init__(self, config: ExpertParallelConfig, links: list[ShardLink], watchdog: Watchdog) -> None:
        self.config = config
        self.links = {link.rank: link for link in links}
        self._watchdog = watchdog
        self.stats = ExchangeStats()  # replace it to measure from zero
        self.step = 0  # forwards so far
        self.failure: ExpertShardFailed | None = None
        self._last_layer: int | None = None

    @classmethod
    def connect(cls, config: ExpertParallelConfig, revision: str) -> ExpertExchange:
        """Dial every shard, check what it serves, open the streams; ExpertShardFailed if one does not answer in
        `connect_timeout` seconds, ValueError if one serves another checkpoint, rank or placement."""
        metadata = bearer_metadata(config.cluster_token)
        links: list[ShardLink] = []
        watchdog = Watchdog()
        try:
            for rank, address in enumerate(config.shards, start=1):
                channel = _channel(address, config.tls_dir)
                try:
                    _check_info(_describe(channel, rank, address, metadata, config.connect_timeout), config, rank,
                                address, revision)
                except BaseException:
                    channel.close()
                    raise
                links.append(ShardLink(rank, address, channel, metadata, watchdog))
        except BaseException:
            for link in links:
                link.close()
            watchdog.stop()
            raise
        log.info("expert-parallel replica connected", extra={"shards": list(config.shards)})
        return cls(config, links, watchdog)

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self._watchdog.stop()

    def __enter__(self) -> ExpertExchange:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def layer(self, index: int, owners: Sequence[int], held_experts: Sequence[int]) -> RemoteLayer:
        """The exchange of MoE layer `index`, whose expert e is on rank owners[e]; rank 0 holds `held_experts`."""
        ranks = sorted(set(owners) - {0})
        return RemoteLayer(self, index, np.asarray(owners, dtype=np.int64), held_rows(len(owners), held_experts),
                           ranks)

    def begin(self, layer: int) -> int:
        """Note a layer's exchange (a layer index not above the last one starts a new step); returns the step."""
        if self.failure is not None:
            raise ExpertShardFailed(f"the expert-parallel replica is broken: {self.failure}") from self.failure
        if self._last_layer is None or layer <= self._last_layer:
            self.step += 1
            self.stats.steps += 1
        self._last_layer = layer
        return self.step

    def fail(self, failure: ExpertShardFailed) -> None:
        if self.failure is None:
            self.failure = failure
            log.error("expert-parallel exchange failed: %s", failure)


@dataclass
class RemoteLayer:
    """One MoE layer's view of the exchange: which rank holds each expert, and rank 0's rows of its own."""

    exchange: ExpertExchange
    index: int
    owners: np.ndarray  # [E] rank of each expert
    rows_of: np.ndarray  # [E] row of rank 0's held weights (-1: held elsewhere)
    ranks: list[int]  # the shards holding some of this layer's experts

    def __post_init__(self) -> None:
        self.owner_of = torch.from_numpy(self.owners)  # the same memory, as the native split takes it

    def backend(self, local: ExpertsBackend | None) -> RemoteExperts:
        """The layer's backend: rank 0's experts on `local` (None: it holds none), the rest on the shards."""
        return RemoteExperts(self, local)


class RemoteExperts(ExpertsBackend):
    """Experts spread over the replica's ranks: rows to each shard, rank 0's own on `local`, partial sums added."""

    reads_plain_weights = False  # the local backend, built first, decides what rank 0 keeps

    def __init__(self, layer: RemoteLayer, local: ExpertsBackend | None) -> None:
        self.layer, self.local = layer, local
        self.relaid = local is not None and local.relaid
        self.panels, self.packed13 = getattr(local, "panels", None), getattr(local, "packed13", None)

    @classmethod
    def serves(cls, target: Target) -> bool:
        return True  # chosen by the placement (MoEExperts.remote), never from the backend table

    @classmethod
    def build(cls, w13: torch.Tensor, w2: torch.Tensor, target: Target) -> RemoteExperts:
        raise TypeError("RemoteExperts is built from a RemoteLayer, not from weights")

    def __call__(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        expert_ids: Iterable[int] | None = None,
        alongside: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The weighted sum over every rank's experts; `alongside()` (more of the layer's work, a shared expert)
        runs after rank 0's own experts, while the shards compute, and its result is added last."""
        layer, exchange = self.layer, self.layer.exchange
        step = exchange.begin(layer.index)
        wanted = None
        if expert_ids is not None:
            wanted = torch.zeros(len(layer.owners), dtype=torch.uint8)
            wanted[list(expert_ids)] = 1
        started = time.perf_counter()
        routed = split_by_rank(layer.owner_of, topk_ids, topk_weights, wanted, len(exchange.links) + 1)
        sent = self._send(step, x, routed)
        out = torch.zeros_like(x)
        local_started = time.perf_counter()
        try:
            if self.local is not None and routed[0] is not None:
                self._run_local(x, routed[0], out)
            extra = alongside() if alongside is not None else None
        except BaseException as exc:  # the shards' answers go unread: the streams are out of step from here on
            if sent:
                exchange.fail(ExpertShardFailed(f"rank 0's experts failed mid-exchange: {exc!r}"))
            raise
        if sent:
            waited = time.perf_counter()
            shard_seconds, peers = self._gather(sent, out)
            done = time.perf_counter()
            exchange.stats.wait_seconds += done - waited
            exchange.stats.record(done - started, max(shard_seconds, waited - local_started), shard_seconds, peers)
        return out if extra is None else out + extra

    def _run_local(self, x: torch.Tensor, own: Routed, out: torch.Tensor) -> None:
        """Add rank 0's own experts' weighted outputs into `out`."""
        rows = own.rows_on(x.device)
        held = run_held(self.local, self.layer.rows_of, x.index_select(0, rows), own.ids, own.weights)
        out.index_add_(0, rows, held)

    def _send(self, step: int, x: torch.Tensor,
              routed: list[Routed | None]) -> list[tuple[ShardLink, int, torch.Tensor, np.ndarray | None]]:
        """The LayerWork of each shard with rows in this layer (several for a share over MESSAGE_PART_BYTES):
        (link, sequence, token rows, the same on the host or None for every row in order) of each message, in the
        order sent."""
        exchange, sent = self.layer.exchange, []
        part_rows = max(1, MESSAGE_PART_BYTES // (x.shape[1] * x.element_size()))
        for rank in self.layer.ranks:
            work = routed[rank]
            if work is None:
                continue  # no token routed there: no message
            link = exchange.links[rank]
            for start in range(0, work.rows.size, part_rows):
                part = work if work.rows.size <= part_rows else work.part(start, start + part_rows)
                rows = part.rows_on(x.device)
                # Every token: no gather. index_select rather than x[rows]: 2.1 against 4.8 µs for 20 of 32 rows.
                every = part.rows.size == x.shape[0]  # the rows are ascending and distinct: 0..T-1
                hidden = x if every else x.index_select(0, rows)
                sequence, size = link.send(step, self.layer.index, hidden, part.ids, part.weights)
                stats = exchange.stats
                stats.messages += 1
                stats.bytes_sent += size
                stats.rows_sent += part.rows.size
                stats.choices_sent += part.choices
                sent.append((link, sequence, rows, None if every else part.rows))
        return sent

    def _gather(self, sent: list[tuple[ShardLink, int, torch.Tensor, np.ndarray | None]],
                out: torch.Tensor) -> tuple[float, int]:
        """Add each shard's partial sums into its token rows of `out`, waiting at most the exchange timeout;
        returns the longest time a shard reported spending on its messages, and how many shards answered."""
        exchange = self.layer.exchange
        timeout = exchange.config.exchange_timeout
        deadline = time.monotonic() + timeout
        spent: dict[int, float] = {}  # each shard's compute over its messages
        host_out = out.numpy() if out.device.type == "cpu" and out.dtype == torch.float32 else None
        for link, sequence, rows, host_rows in sent:
            try:
                answer, size = link.receive(sequence, self.layer.index, deadline, timeout)
                try:
                    add_partial(out, host_out, rows, host_rows, answer.partial)
                except ValueError as exc:
                    raise ExpertShardFailed(f"{link} answered layer {self.layer.index} with {exc}") from None
            except ExpertShardFailed as failure:
                exchange.fail(failure)
                raise
            exchange.stats.bytes_received += size
            exchange.stats.shard_compute_seconds += answer.compute_seconds
            spent[link.rank] = spent.get(link.rank, 0.0) + answer.compute_seconds
        return max(spent.values()), len(spent)


def add_partial(out: torch.Tensor, host_out: np.ndarray | None, rows: torch.Tensor, host_rows: np.ndarray | None,
                partial: common_pb2.Tensor) -> None:
    """Add a shard's partial sums [n, H] into rows `rows` of `out` [T, H] (`host_rows` the same rows on the host,
    None for all T in order); ValueError if the partial sums are not [n, H] of a float dtype.

    `host_out` is `out`'s memory as a float32 array where out is on the CPU in float32: a float32 answer is then
    added with numpy, viewing the message's bytes (one call where every row is the shard's, as at a decode step of
    one sequence, else one indexed add; the rows are distinct). Rank 0 runs this right after its own compute, where
    few calls matter most: from an answer's arrival to its sums added, 51 µs in place against 78 through torch's
    decoding and index_add_ at 1 sequence, 74-84 against 126-138 at 32 (bench/ep_bench.py's checkpoint, 2 ranks,
    alternating runs). Otherwise, through torch.
    """
    n, width = rows.shape[0], out.shape[1]
    if host_out is not None and partial.dtype == "float32":
        values = tensors.array_from_pb(partial)
        if values.shape != (n, width):
            raise ValueError(f"partial sums of shape {list(values.shape)}, expected [{n}, {width}]")
        if host_rows is None:
            host_out += values
        else:
            host_out[host_rows] += values
        return
    values = tensors.from_pb(partial, copy=False)  # read only
    if tuple(values.shape) != (n, width) or not values.is_floating_point():
        raise ValueError(f"partial sums of {values.dtype} {list(values.shape)}, expected floats [{n}, {width}]")
    out.index_add_(0, rows, values.to(device=out.device, dtype=out.dtype))


def _channel(address: str, tls_dir: pathlib.Path | None) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    if tls_dir is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, channel_credentials(tls_dir, "worker"), options=options)


def _describe(channel: grpc.Channel, rank: int, address: str, metadata, timeout: float) -> experts_pb2.ShardInfo:
    stub = experts_pb2_grpc.ExpertShardStub(channel)
    try:
        return stub.Describe(experts_pb2.DescribeShardRequest(), metadata=metadata, timeout=timeout,
                             wait_for_ready=True)
    except grpc.RpcError as exc:
        raise ExpertShardFailed(f"expert shard rank {rank} at {address}: {exc.code().name}: {exc.details()}") from None


def _check_info(info: experts_pb2.ShardInfo, config: ExpertParallelConfig, rank: int, address: str,
                revision: str) -> None:
    """ValueError naming what a shard serves differently from this rank."""
    expected = {"rank": rank, "world_size": config.placement.world_size, "revision": revision,
                "placement": config.placement.to_json()}
    for name, want in expected.items():
        got = getattr(info, name)
        if got != want:
            raise ValueError(f"ep_shards: the shard at {address} has {name} {got!r}, rank 0 expects {want!r}")
