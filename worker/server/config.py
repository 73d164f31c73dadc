"""Worker configuration."""

from __future__ import annotations

import pathlib
import sys
from typing import Literal

import pydantic
from pydantic_settings import SettingsConfigDict

from moemesh.services.core.config import MetricsPort, ServiceConfig

# Sequences a worker's engine runs at once, unless configured: the one default `moemesh up` and the
# worker share.


DEVICE_PATTERN = r"^(cpu|cuda(:[0-9]+)?)$"


def device_present(device: str) -> str:
    """`device` ("cpu" or "cuda[:N]") if this process can use it; ValueError saying why not."""
    if not device.startswith("cuda"):
        return device
    import torch  # here: only a worker's or shard's config asks, and only for a CUDA device

    if not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"{device}: no CUDA device is visible to this process (PyTorch {torch.__version__}, {build})")
    index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"{device}: this process sees {count} CUDA device(s), numbered from 0")
    return device


def require_device(service: str, device: str) -> None:
    """Stop the process (status 2, one line saying why) if it cannot use `device`: a worker or shard told to run on
    a GPU it cannot see stops at its start with that, not deep in PyTorch's model load with an AssertionError.
    Checked when the service starts, not when its config is read, so that a configuration meant for a GPU host
    still loads, and is checked, on a machine without one."""
    try:
        device_present(device)
    except ValueError as exc:
        print(f"moemesh-{service}: device: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class WorkerConfig(ServiceConfig):
    """Everything a worker process needs; built once in ``main()``."""

    model_config = SettingsConfigDict(env_prefix="MOEMESH_WORKER_")

    model_dir: pathlib.Path = pydantic.Field(description="Hugging Face checkpoint directory of the generation model")
    model_id: str | None = pydantic.Field(default=None, description="id clients use; default: the checkpoint directory's name")
    embedding_model_dir: pathlib.Path | None = pydantic.Field(
        default=None, description="sentence-embedding model directory to serve beside the generation model; unset: none")
    host: str = pydantic.Field(default="127.0.0.1", description="address the worker's gRPC server binds")
    port: int = pydantic.Field(default=0, ge=0, le=65535, description="gRPC port (0: a free one)")
    advertise_address: str | None = pydantic.Field(
        default=None, description="this worker's address as others should dial it; default host:bound port")
    scheduler: str = pydantic.Field(min_length=3, description="scheduler host:port")
    node_id: str | None = pydantic.Field(default=None, description="unique node id; default hostname-pid-random")
    replica_group: str | None = pydantic.Field(
        default=None, description="replica group id, the same on every rank of an expert-parallel replica (its "
                                  "shards' --replica-group); default the node id")
    ep_shards: str | None = pydantic.Field(
        default=None, description="expert parallelism (this worker is rank 0): the expert shards' host:port, ranks "
                                  "1..N-1 in order, comma-separated; unset: every expert in this process")
    ep_placement: str | None = pydantic.Field(
        default=None, description='with ep_shards: expert -> rank map, the same on every rank: "contiguous" '
                                  '(default), "0,0,1,1", or JSON {"experts": [...], "layers": {"3": [...]}}')
    ep_exchange_timeout: float = pydantic.Field(
        default=10.0, gt=0, le=600, description="with ep_shards: seconds one MoE layer's exchange may take before "
                                                "the shard counts as stalled and this replica fails (restarts)")
    ep_connect_timeout: float = pydantic.Field(
        default=30.0, gt=0, le=3600, description="with ep_shards: seconds to wait at start for every shard to answer")
    device: str = pydantic.Field(default="cpu", pattern=DEVICE_PATTERN, description='"cpu" or "cuda[:N]"')
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = pydantic.Field(
        default="auto", description="weights and KV cache dtype; auto: bfloat16 on CUDA, float32 on the CPU")
    max_num_seqs: int | None = pydantic.Field(
        default=None, ge=1, le=4096,
        description="sequences the engine runs at once; unset: sized from the KV pool (a slot per 1,024 tokens of "
                    "it, at most 256), overflow preempted")
    max_model_len: int = pydantic.Field(default=2048, ge=16, description="longest sequence (prompt + output), tokens")
    max_output_tokens: int = pydantic.Field(default=1024, ge=1, description="most tokens one request may generate")
    block_size: int = pydantic.Field(default=16, ge=1, le=1024, description="tokens per paged KV cache block")
    num_kv_blocks: int = pydantic.Field(
        default=0, ge=0, description="KV cache blocks in the pool; 0: on CUDA what gpu_memory_utilization leaves, "
                                     "on the CPU what cpu_kv_cache_gib holds")
    cpu_kv_cache_gib: float = pydantic.Field(
        default=0.0, ge=0, description="on the CPU, GiB for the KV pool; 0: the smaller of 2 GiB and 10% of the "
                                       "machine's memory")
    gpu_memory_utilization: float = pydantic.Field(
        default=0.9, gt=0, le=1,
        description="on CUDA, the fraction of the device's memory the worker fills: weights, a step's activations, "
                    "the KV pool")
    cuda_graphs: bool = pydantic.Field(
        default=True, description="on CUDA, capture decode steps as CUDA graphs at start-up and replay them "
                                  "(where every operation's backend allows it); off: every step runs eagerly")
    max_num_batched_tokens: int | None = pydantic.Field(
        default=None, ge=1, description="most new tokens one engine step computes (prompt chunks plus one per decode); "
                                        "unset: 2048 on CUDA, on the CPU 256 per compute thread from 512 to 2048 (at "
                                        "least max_num_seqs)")
    enable_prefix_caching: bool = pydantic.Field(default=True, description="reuse the KV blocks of shared prompt prefixes")
    kv_tier_url: str | None = pydantic.Field(
        default=None, description="Redis URL of the shared prefix-KV tier; unset: off. A URL with a password belongs "
                                  "in the environment (MOEMESH_WORKER_KV_TIER_URL) or a secret file, not this flag")
    kv_tier_ttl: float = pydantic.Field(default=3600.0, gt=0, description="lifetime of a KV-tier entry, seconds")
    kv_tier_timeout: float = pydantic.Field(default=0.2, gt=0, le=10, description="timeout of one KV-tier call, seconds")
    kv_tier_scope: str = pydantic.Field(default="shared", description="key scope of the KV tier")
    kv_tier_secret: pydantic.SecretStr | None = pydantic.Field(
        default=None, min_length=16,
        description="mesh secret signing KV-tier entries (HMAC-SHA256), the same on every worker that shares "
                    "blocks; unset: a random one per process (entries serve only the worker that wrote them)")
    kv_tier_writes: Literal["reused", "all"] = pydantic.Field(
        default="reused", description='which prompt blocks go to the tier: "reused" (after a local prefix hit shows '
                                      'they recur) or "all"')
    pooled_embeddings: bool = pydantic.Field(
        default=True, description='also serve "<model_id>-pooled": mean-pooled hidden states of the generation model')
    num_threads: int = pydantic.Field(default=0, ge=0, description="torch threads; 0: torch's default")
    pack_weights: bool = pydantic.Field(
        default=True, description="on the CPU, lay the matmul weights out once for the fastest kernels at load")
    cluster_token: pydantic.SecretStr | None = pydantic.Field(
        default=None, min_length=8,
        description="the mesh's shared secret: presented to the scheduler, and required of every caller of this "
                    "worker (metadata authorization: Bearer <token>); give it by environment "
                    "(MOEMESH_WORKER_CLUSTER_TOKEN) or a secret file, not this flag (argv shows in ps)")
    drain_grace: float = pydantic.Field(
        default=30.0, ge=0, description="seconds in-flight requests get to finish on SIGTERM")
    log_level: str = pydantic.Field(default="info", description="log level")
    metrics_port: MetricsPort = None

    @pydantic.model_validator(mode="after")
    def _budget_covers_the_batch(self) -> WorkerConfig:
        if None not in (self.max_num_seqs, self.max_num_batched_tokens) and \
                self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs ({self.max_num_seqs})"
            )
        return self

    @pydantic.model_validator(mode="after")
    def _placement_spreads_over_shards(self) -> WorkerConfig:
        if self.ep_placement and not self.ep_shards:
            raise ValueError("ep_placement: needs ep_shards (a placement spreads experts over shard processes)")
        return self

    @pydantic.field_validator("ep_shards")
    @classmethod
    def _shards_are_addresses(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        for address in value.split(","):
            host, _, port = address.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected host:port[,host:port...] (ranks 1..N-1 in order), got {address!r}")
        return value

    @property
    def shard_addresses(self) -> tuple[str, ...]:
        """The expert shards' addresses, rank 1 first (empty: a single-process replica)."""
        return tuple(a.strip() for a in self.ep_shards.split(",")) if self.ep_shards else ()

    @pydantic.field_validator("model_dir")
    @classmethod
    def _model_dir_exists(cls, value: pathlib.Path) -> pathlib.Path:
        if not (value / "config.json").is_file():
            raise ValueError(f"{value} is not a Hugging Face checkpoint directory (no config.json)")
        return value
