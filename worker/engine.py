"""The generation engine: iteration-level batching over a slot KV cache.

Requests join the running batch at the next step (their prompt is prefilled
in that step) and leave it as soon as they finish; every running sequence
advances by one token per step in one batched forward call. This object is
synchronous and owned by one thread (see ``runner.py``).
"""

from __future__ import annotations

import collections
import logging
import random
import time
from dataclasses import dataclass, field

import torch

from moemesh.services.core.errors import InvalidRequest
from moemesh.worker.requests import GenerationRequest, RequestOutput
from moemesh.worker.sampling import SamplingBatch, sample
from moemesh.worker.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Sequence:
    """A request being served: its tokens, slot, detokenizer and stop state."""

    request: GenerationRequest
    slot: int
    seed: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int]  # prompt + resumed + generated
    num_generated: int = 0  # including resumed tokens
    pending_text: str = ""  # decoded but held back: it may start a stop string
    finish_reason: str | None = None
    new_token_ids: list[int] = field(default_factory=list)

    @property
    def params(self):
        return self.request.params


class Engine:
    """Admits, steps and retires sequences; one batched model call per phase."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, *, max_num_seqs: int, max_model_len: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_num_seqs = max_num_seqs
        self.max_model_len = min(max_model_len, model.max_context_tokens)
        self.cache = model.make_cache(max_num_seqs, self.max_model_len)
        self.device = next(model.parameters()).device
        self.waiting: collections.deque[GenerationRequest] = collections.deque()
        self.running: dict[str, Sequence] = {}
        self.free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.aborted: dict[str, str] = {}
        self.num_steps = 0

    # ---- admission -------------------------------------------------------
    def check(self, request: GenerationRequest) -> None:
        """Raise InvalidRequest when the request cannot fit this engine's context."""
        total = len(request.prompt_token_ids) + len(request.resume_token_ids)
        if not request.prompt_token_ids:
            raise InvalidRequest("prompt", "is empty after tokenization")
        if total >= self.max_model_len:
            raise InvalidRequest("prompt", f"{total} tokens; the limit is {self.max_model_len - 1}")

    def add(self, request: GenerationRequest) -> None:
        self.check(request)
        self.waiting.append(request)

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Mark a request to leave at the next step (waiting or running)."""
        self.aborted[request_id] = reason

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.aborted)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ----------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Retire aborted/expired requests, prefill newcomers, decode the rest."""
        outputs = self._retire_aborted()
        decoding = list(self.running.values())
        admitted = self._admit()
        with torch.inference_mode():
            for seq in admitted:
                self._prefill(seq)
            if decoding:
                self._decode(decoding)
        self.num_steps += 1
        return outputs + [self._collect(seq) for seq in [*admitted, *decoding]]

    def _retire_aborted(self) -> list[RequestOutput]:
        now = time.time()
        for seq in self.running.values():
            deadline = seq.request.deadline
            if deadline is not None and now > deadline:
                self.aborted.setdefault(seq.request.request_id, "deadline")
        outputs = []
        for request_id, reason in list(self.aborted.items()):
            seq = self.running.get(request_id)
            if seq is not None:
                seq.finish_reason = reason
                outputs.append(self._collect(seq))
        still_waiting = [r for r in self.waiting if r.request_id not in self.aborted]
        for request in self.waiting:
            if request.request_id in self.aborted:
                outputs.append(RequestOutput(request.request_id, finish_reason=self.aborted[request.request_id],
                                             prompt_tokens=len(request.prompt_token_ids)))
        self.waiting = collections.deque(still_waiting)
        self.aborted.clear()
        return outputs

    def _admit(self) -> list[Sequence]:
        admitted = []
        while self.waiting and self.free_slots:
            request = self.waiting.popleft()
            resumed = list(request.resume_token_ids)
            seq = Sequence(
                request=request,
                slot=self.free_slots.pop(),
                seed=request.params.seed if request.params.seed is not None else random.getrandbits(31),
                detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids=[*request.prompt_token_ids, *resumed]),
                token_ids=[*request.prompt_token_ids, *resumed],
                num_generated=len(resumed),
            )
            self.running[request.request_id] = seq
            admitted.append(seq)
        return admitted

    def _prefill(self, seq: Sequence) -> None:
        ids = torch.tensor([seq.token_ids], dtype=torch.long, device=self.device)  # [1, T]
        positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)  # [1, T]
        slots = torch.tensor([seq.slot], dtype=torch.long, device=self.device)
        logits = self.model(ids, positions, slots, self.cache)[:, -1]  # [1, V]
        self._append(seq, self._sample(logits, [seq])[0])

    def _decode(self, seqs: list[Sequence]) -> None:
        ids = torch.tensor([[s.token_ids[-1]] for s in seqs], dtype=torch.long, device=self.device)  # [B, 1]
        positions = torch.tensor([[len(s.token_ids) - 1] for s in seqs], dtype=torch.long, device=self.device)
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.long, device=self.device)  # [B]
        logits = self.model(ids, positions, slots, self.cache)[:, -1]  # [B, V]
        for seq, token in zip(seqs, self._sample(logits, seqs)):
            self._append(seq, token)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        batch = SamplingBatch.build(
            [s.params for s in seqs], [s.seed for s in seqs], [s.num_generated for s in seqs], self.device
        )
        return sample(logits, batch).tolist()

    # ---- outputs -----------------------------------------------------------
    def _append(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
        seq.new_token_ids.append(token)
        seq.num_generated += 1
        params = seq.params
        if not params.ignore_eos and token in self.tokenizer.eos_token_ids or token in params.stop_token_ids:
            seq.finish_reason = "stop"
            seq.pending_text += seq.detokenizer.flush()
            return
        seq.pending_text += seq.detokenizer.push([token])
        if params.stop and self._cut_at_stop(seq):
            seq.finish_reason = "stop"
        elif seq.num_generated >= params.max_tokens:
            seq.finish_reason = "length"
        elif len(seq.token_ids) >= self.max_model_len:
            seq.finish_reason = "context"
        if seq.finish_reason:
            seq.pending_text += seq.detokenizer.flush()
            if params.stop:
                self._cut_at_stop(seq)

    @staticmethod
    def _cut_at_stop(seq: Sequence) -> bool:
        """Truncate pending text at the first stop string; True if one was found."""
        hits = [i for i in (seq.pending_text.find(s) for s in seq.params.stop) if i >= 0]
        if not hits:
            return False
        seq.pending_text = seq.pending_text[: min(hits)]
        return True

    def _collect(self, seq: Sequence) -> RequestOutput:
        """Take the sequence's new output; free its slot if it finished."""
        text = seq.pending_text
        if seq.finish_reason is None and seq.params.stop:
            # Hold back a tail that could still grow into a stop string.
            keep = max(len(s) for s in seq.params.stop) - 1
            cut = max(0, len(text) - keep)
            text, seq.pending_text = text[:cut], text[cut:]
        else:
            seq.pending_text = ""
        output = RequestOutput(
            request_id=seq.request.request_id,
            text=text,
            token_ids=seq.new_token_ids,
            finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.request.prompt_token_ids),
            completion_tokens=seq.num_generated,
        )
        seq.new_token_ids = []
        if seq.finish_reason is not None:
            self.running.pop(seq.request.request_id, None)
            self.free_slots.append(seq.slot)
        return output
