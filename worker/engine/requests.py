"""Plain request and output records of the worker (protobuf stops at the servicer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moemesh.worker.engine.sampling import SamplingParams, TokenLogprobs

if TYPE_CHECKING:
    from moemesh.worker.engine.grammar import Grammar


@dataclass(frozen=True)
class GenerationRequest:
    """One generation as the engine receives it: token ids and decoding parameters."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    # Absolute time.time() after which the request is aborted; None = no deadline.
    deadline: float | None = None
    # Tokens an earlier replica already delivered (failover): prefilled, not re-emitted.
    resume_token_ids: tuple[int, ...] = ()
    # Characters of the resumed tokens' text the client already has; the rest is emitted first.
    resume_text_chars: int = 0
    # The compiled grammar the output must follow (structured outputs); None: free text.
    grammar: Grammar | None = None
    # Whose prefix-cache blocks it may reuse (the tenant's cache scope); "": the scope of requests naming none.
    cache_scope: str = ""


@dataclass
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    # None while running; else "stop", "length", "abort", "deadline" or "context".
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # One entry per token in token_ids when the request asked for logprobs, else empty.
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # With prompt_logprobs, in the first output: one entry per prompt token (the first: logprob 0, no top).
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
