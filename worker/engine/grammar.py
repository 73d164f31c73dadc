"""Grammar-constrained decoding: grammars compiled per tokenizer, a matcher per sequence, and the batched mask.

A request's structured-output field becomes an llguidance grammar
(`services/core/structured.py`); `GrammarCompiler` compiles it against this
model's tokenizer once per distinct grammar text and keeps the result
(least recently used first out). Compilation runs where the caller runs it:
the worker's servicer does it on a thread of its own before it hands the
request to the engine, so the engine thread never compiles and a request
waits only for its own grammar.

Each constrained sequence owns a matcher (a copy of the compiled grammar's).
At every step the engine asks `token_masks` for the allowed-token bitmask of
the rows that carry a matcher (computed in Rust, no per-token Python), sampling sets every other token of those rows to -inf
(`sampling.constrain`), and the sampled token advances the matcher
(`advance`). Rows without a grammar are untouched, so constrained and free
requests share a batch. When the grammar can produce nothing more, the
sequence ends with "stop", as if the model had produced EOS.
"""

from __future__ import annotations

import collections
import os
import threading

import llguidance
import numpy as np
import torch

from moemesh.services.core.errors import InvalidRequest
from moemesh.services.core.structured import grammar_of
from moemesh.v1 import common_pb2
from moemesh.worker.engine.tokenizer import Tokenizer

DEFAULT_MAX_CACHED = 256
BITS = 32  # tokens per int32 word of a bitmask
# Masks are filled across a thread pool for at least this many rows, on machines with at least this many cores.
PARALLEL_ROWS = 32
PARALLEL_MIN_CORES = 8


class Grammar:
    """A grammar compiled against one tokenizer; `matcher()` gives each sequence its own state."""

    def __init__(self, text: str, template: llguidance.LLMatcher) -> None:
        self.text = text
        self._template = template

    def matcher(self) -> llguidance.LLMatcher:
        """A fresh matcher at the grammar's start (a cheap copy: the compiled tables are shared)."""
        return self._template.deep_copy()


class GrammarCompiler:
    """Compiles grammars for one tokenizer and vocabulary, once per distinct text; safe to call from any thread."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_cached: int = DEFAULT_MAX_CACHED) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's logits width (may exceed the tokenizer's: padding ids)
        self.max_cached = max_cached
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self._cache: collections.OrderedDict[str, Grammar] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # grammars compiled (cache misses), for tests and metrics

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        """The tokenizer as llguidance sees it, built on first use (a large vocabulary takes a moment)."""
        with self._lock:
            if self._lltokenizer is None:
                self._lltokenizer = llguidance.LLTokenizer(
                    self._tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                    eos_token=sorted(self._tokenizer.eos_token_ids) or None)
            return self._lltokenizer

    def compile_spec(self, spec: common_pb2.StructuredOutput) -> Grammar:
        """A request's structured-output field, compiled; InvalidRequest naming the field when it cannot be."""
        text = grammar_of(spec)
        try:
            return self.compile(text)
        except ValueError as exc:
            raise InvalidRequest(f"sampling.structured.{spec.WhichOneof('kind')}", str(exc)) from None

    def compile(self, text: str) -> Grammar:
        """The grammar `text` (llguidance's format) compiled; ValueError with the library's message if it fails."""
        with self._lock:
            grammar = self._cache.get(text)
            if grammar is not None:
                self._cache.move_to_end(text)
                return grammar
        template = llguidance.LLMatcher(self.lltokenizer, text, log_level=0)
        if template.is_error():
            raise ValueError(template.get_error())
        grammar = Grammar(text, template)
        with self._lock:
            self.compiled += 1
            self._cache[text] = grammar
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return grammar


class MaskBuilder:
    """Fills the allowed-token bitmasks of a step's constrained rows.

    Row by row on the calling thread (about 20 microseconds a row for a JSON
    schema); across a thread pool only for a large batch on a machine with
    cores to spare, since the pool's threads compete with the model's own
    compute threads (on 2 cores the serial loop is 4x faster than the pool).
    """

    def __init__(self, parallel_rows: int = PARALLEL_ROWS, min_cores: int = PARALLEL_MIN_CORES) -> None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self._parallel_rows = parallel_rows if cores >= min_cores else None
        self._executor: llguidance.LLExecutor | None = None

    def token_masks(self, matchers: list[llguidance.LLMatcher], vocab_size: int) -> torch.Tensor:
        """Bitmasks [R, ceil(V / 32)] int32 on the CPU, one row per matcher: bit t of a row set when token t
        is allowed next."""
        words = -(-vocab_size // BITS)
        masks = torch.empty((len(matchers), words), dtype=torch.int32)
        if self._parallel_rows is not None and len(matchers) >= self._parallel_rows:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], masks.data_ptr(),
                                                   words * 4, len(matchers))
            return masks
        for i, matcher in enumerate(matchers):
            matcher.unsafe_compute_mask_ptr(masks[i].data_ptr(), words * 4)
        return masks


def allowed_tokens(masks: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bitmasks [R, W] int32 as booleans [R, V]: True where a token is allowed (unpacked where they are)."""
    if masks.device.type == "cpu":  # one C pass; bit t of word w is bit t % 8 of little-endian byte 4w + t // 8
        bits = np.unpackbits(masks.numpy().view(np.uint8), axis=1, count=vocab_size, bitorder="little")
        return torch.from_numpy(bits).view(torch.bool)
    return unpack_by_shifts(masks, vocab_size)


def unpack_by_shifts(masks: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`allowed_tokens` with tensor operations, on the masks' device (a GPU's)."""
    shifts = torch.arange(BITS, dtype=torch.int32, device=masks.device)
    bits = (masks.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]
    return bits.view(masks.shape[0], -1)[:, :vocab_size].bool()


def advance(matcher: llguidance.LLMatcher, token: int) -> bool:
    """Feed the sampled token to its sequence's matcher; True when the grammar is complete (nothing may follow)."""
    if not matcher.consume_token(token):
        # The mask allowed only tokens the matcher accepts, so this is a library fault: end the output here
        # rather than let it leave the grammar.
        return True
    return matcher.is_stopped()
