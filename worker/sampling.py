"""Batched token sampling: temperature, top-k, top-p, min-p and seeds, vectorised.

Seeded rows draw their randomness from a counter-based hash of
(seed, output position, token id) rather than from a shared generator, so a
request's samples do not depend on what else is in the batch (Gumbel-max).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters of one request, validated and with defaults applied."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SamplingBatch:
    """Per-row parameters of one step's batch as tensors on the logits' device."""

    temperature: torch.Tensor  # [B] float, 0 for greedy rows
    top_k: torch.Tensor  # [B] long, 0 = off
    top_p: torch.Tensor  # [B] float
    min_p: torch.Tensor  # [B] float
    seed: torch.Tensor  # [B] long
    position: torch.Tensor  # [B] long, index of the token being sampled

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], positions: list[int], device: torch.device) -> SamplingBatch:
        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            temperature=tensor([p.temperature for p in params], torch.float32),
            top_k=tensor([p.top_k for p in params], torch.long),
            top_p=tensor([p.top_p for p in params], torch.float32),
            min_p=tensor([p.min_p for p in params], torch.float32),
            seed=tensor([s & 0x7FFFFFFF for s in seeds], torch.long),
            position=tensor(positions, torch.long),
        )


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V]; returns [B] long."""
    greedy = logits.argmax(dim=-1)  # [B]
    if bool((batch.temperature == 0).all()):
        return greedy
    temperature = batch.temperature.clamp_min(1e-5).unsqueeze(1)  # [B, 1]
    logprobs = _filter(logits.float() / temperature, batch).log_softmax(dim=-1)  # [B, V]
    gumbel = -torch.log(-torch.log(_uniform(batch.seed, batch.position, logits.shape[1]))).float()
    sampled = (logprobs + gumbel).argmax(dim=-1)
    return torch.where(batch.temperature == 0, greedy, sampled)


def _filter(scaled: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k, top-p nucleus and min-p floor."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [B, V]
    vocab = scaled.shape[1]
    rank = torch.arange(vocab, device=scaled.device).unsqueeze(0)  # [1, V]
    k = torch.where(batch.top_k > 0, batch.top_k, vocab).unsqueeze(1)  # [B, 1]
    drop = rank >= k
    probs = sorted_logits.softmax(dim=-1)
    # Keep a token while the mass before it is below top_p (the first always stays).
    drop |= (probs.cumsum(dim=-1) - probs) >= batch.top_p.unsqueeze(1)
    drop |= probs < batch.min_p.unsqueeze(1) * probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(1, order, sorted_logits)


def _uniform(seed: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) noise [B, V] from a hash of (seed, position, token id)."""
    token = torch.arange(vocab, device=seed.device, dtype=torch.long).unsqueeze(0)  # [1, V]
    x = (seed.unsqueeze(1) * 0x9E3779B1 + position.unsqueeze(1) * 0x85EBCA77 + token) & _MASK32
    for multiplier in (0x7FEB352D, 0x846CA68B):  # two rounds of a 32-bit integer mixer
        x = ((x ^ (x >> 16)) * multiplier) & _MASK32
    x = x ^ (x >> 16)
    return (x.double() + 0.5) / 4294967296.0
