"""Worker process entry point: load the model, serve, register, drain on SIGTERM.

With `--ep-shards`, the worker is rank 0 of an expert-parallel replica: it
connects to its expert shards (ranks 1..N-1, `worker.server.shard`) on the
engine thread before building the model, holds only its own routed experts,
registers as rank 0 of its replica group, watches the shards' health, and
closes the exchange when it stops (see worker/server/replica.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import uuid
from typing import NamedTuple

import torch

from moemesh.cache.kv_tier import BlockSpec, RedisKVTier
from moemesh.services.core.auth import WORKER_ACCESS, ClusterAuthInterceptor, bearer_metadata
from moemesh.services.core.entrypoint import service_main
from moemesh.services.core.metrics import counter, gauge, median, serve_metrics
from moemesh.services.core.processes import release_free_heap
from moemesh.services.core.server import GrpcServer, announce_ready, stop_event_on_signals
from moemesh.services.core.tls import aio_channel, server_credentials
from moemesh.v1 import models_pb2, scheduler_pb2, worker_pb2, worker_pb2_grpc
from moemesh.worker.embeddings.pooled import PooledEmbedder
from moemesh.worker.embeddings.sentence import EmbeddingModel, SentenceEmbedder
from moemesh.worker.engine.engine import Engine
from moemesh.worker.engine.kv_sizing import (
    GIB,
    MAX_AUTO_SEQS,
    auto_max_num_seqs,
    cpu_kv_budget_bytes,
    default_token_budget,
    plan_cpu_kv_pool,
    plan_gpu_kv_pool,
)
from moemesh.worker.engine.tokenizer import Tokenizer
from moemesh.worker.models.checkpoint import open_checkpoint
from moemesh.worker.models.expert_load import ExpertLoad, count_expert_load
from moemesh.worker.models.registry import build_model, resolve_dtype
from moemesh.worker.ops.remote import ExpertExchange
from moemesh.worker.ops.report import describe_backends
from moemesh.worker.server.config import WorkerConfig, require_device
from moemesh.worker.server.membership import Membership
from moemesh.worker.server.replica import ShardWatch, connect_exchange, replica_placement
from moemesh.worker.server.runner import EngineFailed, EngineRunner
from moemesh.worker.server.service import WorkerServicer
from moemesh.worker.server.shard import held_experts

log = logging.getLogger("moemesh.worker")

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
EXIT_ENGINE_FAILED = 70  # EX_SOFTWARE: the engine loop raised; the supervisor restarts the worker
class WorkerProcess:
    """Everything one worker process runs, started and stopped in order."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.checkpoint = open_checkpoint(config.model_dir)
        self.model_id = config.model_id or self.checkpoint.model_id
        self.node_id = config.node_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.tokenizer = Tokenizer.from_dir(config.model_dir)
        self.placement = replica_placement(config, self.checkpoint)  # None: a single-process replica
        self.exchange: ExpertExchange | None = None  # rank 0's streams to its expert shards (made on the engine thread)
        self.expert_load: ExpertLoad | None = None  # tokens per expert, counted on the engine thread
        self._expert_load_read: asyncio.Future | None = None
        # Embedding models this worker serves, by id; the first is the default for requests naming none.
        self.embedders: dict[str, EmbeddingModel] = {}
        # Every model is built, and runs, on the engine thread (see runner.py).
        self.runner = EngineRunner(self._build)
        self.engine = self.runner.launch()
        self.servicer = WorkerServicer(self.runner, self.tokenizer, self.model_id,
                                       self.checkpoint.generation_defaults, self.embedders)
        self.server: GrpcServer | None = None  # made in run(): grpc.aio binds to the running loop

    def _build(self) -> Engine:
        """The engine and the embedding models (runs on the engine thread)."""
        config = self.config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if self.placement is not None:
            self.exchange = connect_exchange(config, self.checkpoint, self.placement)
        try:
            engine = self._build_engine()
        except BaseException:
            if self.exchange is not None:
                self.exchange.close()
            raise
        if self.expert_load is not None:
            self.expert_load.take()  # count from zero: not the warm-up and capture passes
        return engine

    def _build_engine(self) -> Engine:
        config = self.config
        model = build_model(self.checkpoint, dtype=resolve_dtype(config.dtype, config.device), device=config.device,
                            pack_weights=config.pack_weights, expert_parallel=self.exchange)
        release_free_heap()  # the load's temporaries
        log.info("backends: %s", describe_backends(model))  # which kernels run, and why (a fallback shows here)
        self.expert_load = count_expert_load(model)
        size = engine_size(model, config)
        engine = Engine(
            model,
            self.tokenizer,
            max_num_seqs=size.max_num_seqs,
            max_model_len=config.max_model_len,
            num_blocks=size.num_blocks,
            block_size=config.block_size,
            max_num_batched_tokens=size.max_num_batched_tokens,
            enable_prefix_caching=config.enable_prefix_caching,
            cuda_graphs=config.cuda_graphs,
        )
        if config.kv_tier_url and config.enable_prefix_caching:
            dtype = str(engine.cache.k[0].dtype).removeprefix("torch.")
            engine.kv_tier = RedisKVTier(
                config.kv_tier_url, self.model_id, self.checkpoint.revision, BlockSpec(dtype, engine.cache.block_shape),
                scope=config.kv_tier_scope, ttl=config.kv_tier_ttl, timeout=config.kv_tier_timeout,
                secret=config.kv_tier_secret.get_secret_value() if config.kv_tier_secret else None,
            )
            engine.kv_tier_writes = config.kv_tier_writes
        if config.embedding_model_dir:
            sentence = SentenceEmbedder.load(config.embedding_model_dir, device=config.device)
            self.embedders[sentence.model_id] = sentence
        if config.pooled_embeddings:
            pooled = PooledEmbedder(model, self.tokenizer, self.model_id, self.checkpoint.revision, engine.max_model_len)
            self.embedders[pooled.model_id] = pooled
        return engine

    def models(self) -> list[models_pb2.ModelInfo]:
        served = [models_pb2.ModelInfo(
            id=self.model_id,
            revision=self.checkpoint.revision,
            kind=models_pb2.MODEL_KIND_GENERATION,
            architecture=self.checkpoint.architecture,
            max_context_tokens=self.engine.max_model_len,
            max_output_tokens=min(self.config.max_output_tokens, self.engine.max_model_len - 1),
        )]
        for embedder in self.embedders.values():
            served.append(models_pb2.ModelInfo(
                id=embedder.model_id,
                revision=embedder.revision,
                kind=models_pb2.MODEL_KIND_EMBEDDING,
                max_context_tokens=embedder.max_context_tokens,
                max_batch_inputs=embedder.max_batch_inputs,
                dimensions=embedder.dimensions,
            ))
        return served

    def load(self) -> scheduler_pb2.NodeLoad:
        stats = self.runner.stats()
        return scheduler_pb2.NodeLoad(
            running_seqs=stats.running,
            waiting_seqs=stats.waiting,
            free_kv_blocks=self.engine.num_free_blocks,
            steps_per_second=stats.steps_per_second,
            seconds_since_progress=stats.seconds_since_progress,
            expert_load=self._expert_load_since_last_beat(),
            draining=self.servicer.draining,
        )

    def _expert_load_since_last_beat(self) -> list[int]:
        """Tokens per expert that the last read found, and a new read queued to the engine thread.

        The counts live where the model runs (on CUDA, on the device); reading them there between steps costs
        one small device read per heartbeat and never blocks the event loop, so each heartbeat carries what
        the read queued by the one before it found.
        """
        if self.expert_load is None:
            return []
        read, found = self._expert_load_read, []
        if read is not None and read.done():
            found = read.result() if read.exception() is None else []  # the engine failed: nothing to report
        if read is None or read.done():
            self._expert_load_read = self.runner.call(self.expert_load.take)
        return found

    def metrics(self) -> list:
        """The worker's metric families, read from the live engine."""
        c, engine = self.engine.counters, self.engine
        labels = {"model": self.model_id}
        return [
            counter("moemesh_worker_steps", "Engine steps (forward calls).", c.steps, labels),
            counter("moemesh_worker_prompt_tokens_computed", "Prompt tokens run through the model.",
                    c.prompt_tokens_computed, labels),
            counter("moemesh_worker_prefix_cache_hit_tokens", "Tokens whose KV came from the prefix cache.",
                    c.prefix_hit_tokens, labels),
            counter("moemesh_worker_generated_tokens", "Tokens generated.", c.generated_tokens, labels),
            counter("moemesh_worker_preemptions", "Sequences preempted for lack of KV blocks.", c.preemptions, labels),
            counter("moemesh_worker_aborts", "Requests aborted (client, deadline).", c.aborts, labels),
            gauge("moemesh_worker_running_seqs", "Sequences in the running batch.", engine.num_running),
            gauge("moemesh_worker_waiting_seqs", "Sequences waiting for the batch.", engine.num_waiting),
            gauge("moemesh_worker_free_kv_blocks", "KV cache blocks free (cached ones included).",
                  engine.num_free_blocks),
            gauge("moemesh_worker_kv_blocks", "KV cache blocks in the pool.", engine.blocks.num_blocks),
            *self._tier_metrics(labels),
        ]

    def _tier_metrics(self, labels: dict[str, str]) -> list:
        tier = self.engine.kv_tier
        if tier is None:
            return []
        t = tier.stats
        return [
            counter("moemesh_kv_tier_hit_blocks", "Prefix blocks served from the Redis tier.", t.hits, labels),
            counter("moemesh_kv_tier_miss_blocks", "Prefix blocks looked up and absent.", t.misses, labels),
            counter("moemesh_kv_tier_rejected_blocks", "Entries ignored as corrupt or mismatched.", t.rejected, labels),
            counter("moemesh_kv_tier_errors", "Failed Redis calls of the tier.", t.errors, labels),
            counter("moemesh_kv_tier_bypassed", "Calls skipped while the circuit was open.", t.bypassed, labels),
            counter("moemesh_kv_tier_stored_blocks", "Blocks written to the tier.", t.stored, labels),
            counter("moemesh_kv_tier_read_bytes", "Bytes read from the tier.", t.bytes_read, labels),
            counter("moemesh_kv_tier_written_bytes", "Bytes written to the tier.", t.bytes_written, labels),
            gauge("moemesh_kv_tier_lookup_seconds_p50", "Median of recent tier lookups.", median(t.lookup_seconds)),
        ]

    def registration(self) -> scheduler_pb2.RegisterRequest:
        return scheduler_pb2.RegisterRequest(
            node_id=self.node_id,
            address=self.config.advertise_address or self.server.address,
            models=self.models(),
            replica_group=self.config.replica_group or self.node_id,
            rank=0,
            world_size=self.placement.world_size if self.placement is not None else 1,
            device=self.config.device,
            placement=self.placement.to_json() if self.placement is not None else "",
            held_experts=held_experts(self.placement, 0) if self.placement is not None else [],
            capacity=scheduler_pb2.Capacity(
                max_num_seqs=self.engine.max_num_seqs,
                max_num_batched_tokens=self.engine.max_num_batched_tokens,
                num_kv_blocks=self.engine.blocks.num_blocks,
                block_size=self.engine.block_size,
            ),
        )

    async def run(self, ready_fd: int | None) -> None:
        stop = stop_event_on_signals()
        credentials = server_credentials(self.config.tls_dir, "worker") if self.config.tls_dir else None
        token = self.config.cluster_token.get_secret_value() if self.config.cluster_token else None
        auth = ClusterAuthInterceptor(token, {WORKER_SERVICE: WORKER_ACCESS}, mutual_tls=self.config.tls_dir is not None)
        self.server = GrpcServer(self.config.host, self.config.port, credentials=credentials, interceptors=[auth])
        self.server.add(worker_pb2_grpc.add_WorkerServicer_to_server, self.servicer, WORKER_SERVICE)
        self.runner.start()
        await self.server.start()
        metadata = bearer_metadata(token)  # the same token, presented to the scheduler
        async with aio_channel(self.config.scheduler, self.config.tls_dir, "worker") as channel:
            membership = Membership(channel, self.registration(), self.load, metadata)
            membership.start()
            await membership.registered.wait()
            watch = ShardWatch(self.config.shard_addresses, self.config.tls_dir, self.runner.fail)
            watch.start()
            await self.server.set_serving(True)
            metrics_address, stop_metrics = None, None
            if self.config.metrics_port is not None:
                metrics_address, stop_metrics = serve_metrics(self.config.host, self.config.metrics_port,
                                                              self.metrics)
            announce_ready(ready_fd, service="worker", address=self.server.address, node_id=self.node_id,
                           model=self.model_id, metrics_address=metrics_address,
                           kv_tokens=self.engine.blocks.num_blocks * self.engine.block_size,
                           max_num_seqs=self.engine.max_num_seqs,
                           max_num_batched_tokens=self.engine.max_num_batched_tokens, **self._replica_info())
            await _first_of(stop.wait(), self.runner.failed.wait())
            await watch.stop()
            if stop_metrics is not None:
                stop_metrics()
            if self.runner.failure is None:
                await self.drain()
                await membership.stop(deregister=True)
            else:
                await self.give_up(membership)
        await self.server.stop()
        await self.runner.stop()
        if self.exchange is not None:
            self.exchange.close()
        if self.runner.failure is not None:
            raise EngineFailed("the engine loop failed") from self.runner.failure

    def _replica_info(self) -> dict:
        """The ready line's description of an expert-parallel replica (nothing for a single process)."""
        if self.placement is None:
            return {}
        return {"replica_group": self.config.replica_group or self.node_id, "rank": 0,
                "world_size": self.placement.world_size, "shards": list(self.config.shard_addresses)}

    async def give_up(self, membership: Membership) -> None:
        """After an engine failure: report unhealthy, leave the registry, then fail in-flight requests over.

        Deregistering first means the scheduler moves the requests to other replicas and sends nothing more
        here; the UNAVAILABLE each in-flight request then gets covers a scheduler that missed the deregistration.
        """
        self.servicer.draining = True
        await self.server.set_serving(False)
        await membership.stop(deregister=True)
        failed = self.runner.fail_in_flight()
        log.error("engine failed: left the mesh and failed %d in-flight requests over; exiting", failed)

    async def drain(self) -> None:
        """Refuse new work; give in-flight requests up to drain_grace seconds."""
        self.servicer.draining = True
        await self.server.set_serving(False)
        try:
            await asyncio.wait_for(self.runner.idle.wait(), self.config.drain_grace)
        except TimeoutError:
            pass  # the grace period is over: what is left is aborted with the server
        log.info("drained", extra={"left_in_flight": self.runner.in_flight})


async def _first_of(*waits) -> None:
    """Return when the first of `waits` (coroutines) finishes; cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()


class EngineSize(NamedTuple):
    num_blocks: int  # the KV pool
    max_num_seqs: int  # sequences in one step
    max_num_batched_tokens: int  # tokens one step computes


def engine_size(model: torch.nn.Module, config: WorkerConfig) -> EngineSize:
    """The KV pool's blocks, the sequence limit and the step's token budget of a worker's engine: as configured,
    else from memory and the compute threads (see kv_sizing.py); logged."""
    max_model_len = min(config.max_model_len, model.max_context_tokens)
    budget = config.max_num_batched_tokens or max(default_token_budget(config.device, torch.get_num_threads()),
                                                  config.max_num_seqs or 0)
    seqs = config.max_num_seqs or min(MAX_AUTO_SEQS, budget)
    if config.num_kv_blocks:
        blocks, source = config.num_kv_blocks, "configured"
    elif config.device.startswith("cuda"):
        plan = plan_gpu_kv_pool(model, block_size=config.block_size, utilization=config.gpu_memory_utilization,
                                max_num_seqs=seqs, max_num_batched_tokens=budget, max_model_len=max_model_len)
        log.info(plan.describe(config.block_size))
        blocks, source = plan.num_blocks, f"{config.gpu_memory_utilization:.2f} of the GPU's memory"
    else:
        kv_bytes = cpu_kv_budget_bytes(config.cpu_kv_cache_gib)
        blocks = plan_cpu_kv_pool(model, block_size=config.block_size, budget_bytes=kv_bytes, max_num_seqs=seqs,
                                  max_model_len=max_model_len)
        source = f"a budget of {kv_bytes / GIB:.2f} GiB"
    if config.max_num_seqs is None:
        seqs = min(auto_max_num_seqs(blocks, config.block_size, max_model_len), budget)
    threads = "" if config.max_num_batched_tokens or config.device.startswith("cuda") else \
        f" (for {torch.get_num_threads()} compute threads)"
    log.info("KV capacity: %d tokens in %d blocks (%s); %d sequences at once%s; at most %d tokens a step%s",
             blocks * config.block_size, blocks, source, seqs, "" if config.max_num_seqs else " (sized from the pool)",
             budget, threads)
    return EngineSize(blocks, seqs, budget)


async def serve(config: WorkerConfig, ready_fd: int | None) -> None:
    require_device("worker", config.device)
    await WorkerProcess(config).run(ready_fd)


def main(argv: list[str] | None = None) -> int:
    try:
        return service_main(argv, service="worker", description=__doc__, config_cls=WorkerConfig,
                            serve=serve)
    except EngineFailed:  # logged where it happened (runner.py)
        return EXIT_ENGINE_FAILED


if __name__ == "__main__":
    sys.exit(main())
