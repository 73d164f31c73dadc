"""The request cost estimate: how many tokens a request may occupy, known before the worker tokenizes it.

One rule for every service: the gateway charges it to a tenant's token
bucket, the scheduler queues and places work by it (queue token bound, fair
share, free KV blocks). The prompt counts its token ids when it has them,
else its characters / CHARS_PER_TOKEN; the output counts max_tokens, or the
contract's default when unset (`SamplingParams.max_tokens` in
protos/moemesh/v1/common.proto, which the worker applies).
"""

from __future__ import annotations

from collections.abc import Iterable

from moemesh.v1 import worker_pb2

CHARS_PER_TOKEN = 4  # prompt size estimate before tokenization (the worker tokenizes)
DEFAULT_MAX_TOKENS = 128  # the contract's default max_tokens (common.proto), as the worker applies it


def estimate_prompt_tokens(work: worker_pb2.GenerationWork) -> int:
    """Prompt tokens: the token ids when given, else characters / CHARS_PER_TOKEN (rounded up by one)."""
    if work.prompt_token_ids:
        return len(work.prompt_token_ids)
    chars = len(work.prompt.text) + sum(len(m.content) for m in work.prompt.chat.messages)
    return chars // CHARS_PER_TOKEN + 1


def estimate_tokens(work: worker_pb2.GenerationWork) -> int:
    """Prompt tokens plus the most the request may generate."""
    max_tokens = work.sampling.max_tokens if work.sampling.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    return estimate_prompt_tokens(work) + max_tokens


def estimate_text_tokens(texts: Iterable[str]) -> int:
    """Tokens of embedding inputs: characters / CHARS_PER_TOKEN (rounded up by one) per input."""
    return sum(len(t) // CHARS_PER_TOKEN + 1 for t in texts)
