"""Worker configuration."""

from __future__ import annotations

import pathlib
from typing import ClassVar, Literal

import pydantic

from moemesh.services.core.config import ServiceConfig


class WorkerConfig(ServiceConfig):
    """Everything a worker process needs; built once in ``main()``."""

    ENV_PREFIX: ClassVar[str] = "MOEMESH_WORKER_"

    model_dir: pathlib.Path
    # Id clients use; default: the checkpoint directory's name.
    model_id: str | None = None
    # Embedding model directory; "" disables embeddings on this worker.
    embedding_model_dir: pathlib.Path | None = None
    host: str = "127.0.0.1"
    port: int = pydantic.Field(default=0, ge=0, le=65535)
    # This worker's address as others should dial it; default host:bound port.
    advertise_address: str | None = None
    scheduler: str = pydantic.Field(min_length=3, description="scheduler host:port")
    node_id: str | None = None
    replica_group: str | None = None
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_num_seqs: int = pydantic.Field(default=16, ge=1, le=4096)
    max_model_len: int = pydantic.Field(default=2048, ge=16)
    max_output_tokens: int = pydantic.Field(default=1024, ge=1)
    # Paged KV cache: tokens per block, and blocks in the pool (0: on CUDA, what gpu_memory_utilization leaves;
    # on the CPU, enough for max_num_seqs at max_model_len).
    block_size: int = pydantic.Field(default=16, ge=1, le=1024)
    num_kv_blocks: int = pydantic.Field(default=0, ge=0)
    # On CUDA, the fraction of the device's memory the worker fills: weights, a step's activations, the KV pool.
    gpu_memory_utilization: float = pydantic.Field(default=0.9, gt=0, le=1)
    # Most new tokens one engine step computes (prompt chunks plus one per decoding sequence).
    max_num_batched_tokens: int = pydantic.Field(default=2048, ge=1)
    enable_prefix_caching: bool = True
    # Shared prefix-KV tier in Redis (None = off): entry lifetime, per-call timeout, key scope.
    kv_tier_url: str | None = None
    kv_tier_ttl: float = pydantic.Field(default=3600.0, gt=0)
    kv_tier_timeout: float = pydantic.Field(default=0.2, gt=0, le=10)
    kv_tier_scope: str = "shared"
    # Which prompt blocks are written: "reused" (after a local prefix hit shows they recur) or "all".
    kv_tier_writes: Literal["reused", "all"] = "reused"
    # Also serve "<model_id>-pooled": mean-pooled hidden states of the generation model as embeddings.
    pooled_embeddings: bool = True
    num_threads: int = pydantic.Field(default=0, ge=0, description="torch threads; 0 = torch's default")
    # On CPU, lay the matmul weights out once for oneDNN (faster matmuls). The experts' weights are held once
    # either way; float32 dense projections also keep their plain copy for the native small-batch kernel.
    pack_weights: bool = True
    cluster_token: str | None = None
    drain_grace: float = pydantic.Field(default=30.0, ge=0)
    log_level: str = "info"
    # Prometheus /metrics on this port (0: a free one); None = off.
    metrics_port: int | None = pydantic.Field(default=None, ge=0, le=65535)

    @pydantic.model_validator(mode="after")
    def _budget_covers_the_batch(self) -> WorkerConfig:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs ({self.max_num_seqs})"
            )
        return self

    @pydantic.field_validator("model_dir")
    @classmethod
    def _model_dir_exists(cls, value: pathlib.Path) -> pathlib.Path:
        if not (value / "config.json").is_file():
            raise ValueError(f"{value} is not a Hugging Face checkpoint directory (no config.json)")
        return value
