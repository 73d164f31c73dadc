"""When a sequence stops, and how much of its output may go out yet.

A sequence stops on an EOS token (unless its request ignores EOS), on one of
its stop token ids, on a stop string (the text is cut where the string
starts), when its grammar is complete, at `max_tokens`, or when it fills the
context. While it runs, a tail
of its text that could still grow into a stop string is held back.
"""

from __future__ import annotations

from collections.abc import Container
from typing import TYPE_CHECKING

from moemesh.worker.engine.requests import RequestOutput

if TYPE_CHECKING:
    from moemesh.worker.engine.sampling import TokenLogprobs
    from moemesh.worker.engine.sequence import Sequence


def append_token(seq: Sequence, token: int, logprobs: TokenLogprobs | None, eos_token_ids: Container[int],
                 max_model_len: int, *, grammar_ended: bool = False) -> bool:
    """Add a sampled token to the sequence and decode it; True (and a finish reason set) when it ends the sequence.

    `grammar_ended`: the token completed the sequence's grammar (nothing may follow), which ends it like EOS.
    """
    seq.token_ids.append(token)
    seq.new_token_ids.append(token)
    if logprobs is not None:
        seq.new_logprobs.append(logprobs)
    seq.num_generated += 1
    params = seq.params
    if (not params.ignore_eos or grammar_ended) and token in eos_token_ids or token in params.stop_token_ids:
        seq.finish_reason = "stop"  # the stop token's own text is not part of the output
        seq.add_text(seq.detokenizer.flush())
        return True
    seq.add_text(seq.detokenizer.push([token]))
    if params.stop and cut_at_stop(seq) or grammar_ended:
        seq.finish_reason = "stop"
    elif seq.num_generated >= params.max_tokens:
        seq.finish_reason = "length"
    elif len(seq.token_ids) >= max_model_len:
        seq.finish_reason = "context"
    if seq.finish_reason is None:
        return False
    seq.add_text(seq.detokenizer.flush())
    if params.stop:  # the flushed characters may complete a stop string
        cut_at_stop(seq)
    return True


def finish_now(seq: Sequence, reason: str) -> Sequence:
    """End a sequence without a new token (e.g. max_tokens 0); returns it."""
    seq.finish_reason = reason
    seq.add_text(seq.detokenizer.flush())
    return seq


def cut_at_stop(seq: Sequence) -> bool:
    """Truncate pending text at the first stop string; True if one was found."""
    hits = [i for i in (seq.pending_text.find(s) for s in seq.params.stop) if i >= 0]
    if not hits:
        return False
    seq.pending_text = seq.pending_text[: min(hits)]
    return True


def take_output(seq: Sequence) -> RequestOutput:
    """Take the sequence's new tokens and the text that may go out now: all of it once the sequence has finished."""
    text = seq.pending_text
    if seq.finish_reason is None and seq.params.stop:
        # Hold back a tail that could still grow into a stop string.
        keep = max(len(s) for s in seq.params.stop) - 1
        cut = max(0, len(text) - keep)
        text, seq.pending_text = text[:cut], text[cut:]
    else:
        seq.pending_text = ""
    prompt_logprobs = []
    if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent and not seq.scores_prompt:
        prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
    output = RequestOutput(
        request_id=seq.request_id,
        text=text,
        token_ids=seq.new_token_ids,
        logprobs=seq.new_logprobs,
        finish_reason=seq.finish_reason,
        prompt_tokens=seq.num_prompt,
        completion_tokens=seq.num_generated,
        cached_tokens=seq.cached_tokens or 0,
        prompt_logprobs=prompt_logprobs,
    )
    seq.new_token_ids, seq.new_logprobs = [], []
    return output
