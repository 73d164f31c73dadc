"""The engine's plain records (no torch): a request being served as a sequence, and the running totals."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moemesh.worker.engine.block_manager import DEFAULT_ROOT, prefix_root

if TYPE_CHECKING:  # annotations only: importing them would pull torch into the scheduler
    from moemesh.worker.engine.requests import GenerationRequest
    from moemesh.worker.engine.sampling import TokenLogprobs
    from moemesh.worker.engine.tokenizer import IncrementalDetokenizer


@dataclass(eq=False)  # identity: a sequence is found in the queues by `is`
class Sequence:
    """A request being served: its tokens, cache blocks, detokenizer and stop state."""

    request: GenerationRequest
    seed: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int]  # prompt + resumed + generated
    num_generated: int = 0  # including resumed tokens
    num_computed: int = 0  # leading tokens whose K/V is in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of the registered full blocks
    prefix_root: bytes = DEFAULT_ROOT  # the first parent of its hash chain: salted by the request's cache scope
    cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission
    num_preemptions: int = 0
    pending_text: str = ""  # decoded but held back: it may start a stop string
    skip_text_chars: int = 0  # characters still to drop: an earlier replica delivered them (failover)
    finish_reason: str | None = None
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    matcher: Any = None  # the grammar's state (an llguidance matcher) for a constrained request
    # With prompt_logprobs: the prompt tokens' logprobs, filled as the prompt is computed; sent once, when full.
    prompt_logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs_sent: bool = False

    @classmethod
    def from_request(cls, request: GenerationRequest, detokenizer: IncrementalDetokenizer) -> Sequence:
        """A new sequence for `request`; resumed tokens (failover) count as generated and are not computed yet."""
        resumed = list(request.resume_token_ids)
        seq = cls(
            request=request,
            seed=request.params.seed if request.params.seed is not None else random.getrandbits(31),
            detokenizer=detokenizer,
            token_ids=[*request.prompt_token_ids, *resumed],
            num_generated=len(resumed),
            skip_text_chars=request.resume_text_chars,
            prefix_root=prefix_root(request.cache_scope) if request.cache_scope else DEFAULT_ROOT,
        )
        if resumed:  # text of the resumed tokens that the client has not received yet goes out first
            seq.add_text(detokenizer.push(resumed))
        return seq

    def add_text(self, text: str) -> None:
        """Append decoded text to `pending_text`, less the characters an earlier replica already delivered.

        The detokenizer may hold back the end of the resumed tokens' text (an unfinished UTF-8 character), so
        those characters can come out with a later push: the count still to skip carries over until it is spent.
        """
        if self.skip_text_chars:
            skipped = min(self.skip_text_chars, len(text))
            text, self.skip_text_chars = text[skipped:], self.skip_text_chars - skipped
        self.pending_text += text

    @property
    def params(self):
        return self.request.params

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def scores_prompt(self) -> bool:
        """True while the prompt's logprobs are wanted and not all computed (its prefix is then not taken
        from the cache: a cached position has no logits)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt


@dataclass
class EngineCounters:
    """Running totals, for metrics and tests."""

    steps: int = 0
    prompt_tokens_computed: int = 0
    prefix_hit_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    aborts: int = 0
    tier_hit_tokens: int = 0  # prompt tokens whose KV came from the shared Redis tier
