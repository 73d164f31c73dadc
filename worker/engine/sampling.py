"""Batched token sampling: penalties, temperature, top-k, top-p, min-p, seeds and logprobs, vectorised.

Order of operations on one step's logits [B, V]:

1. Penalties, on the raw logits as float32, only for the rows that set one
   (a batch where no row does skips this step and does no [B, V] work):

   * ``repetition_penalty`` r (transformers / the CTRL paper): every token that
     occurs in the row's prompt or output has its logit divided by r when it is
     positive and multiplied by r otherwise. 1 is neutral; r > 1 discourages.
   * ``presence_penalty`` p (OpenAI): ``logit -= p`` for every token occurring at
     least once in the output (the prompt does not count). 0 is neutral.
   * ``frequency_penalty`` f (OpenAI): ``logit -= f * count_in_output(token)``.
     0 is neutral.

   The repetition penalty is applied first, then presence and frequency.
1b. Rows constrained by a grammar (structured outputs, see grammar.py) keep
   only the tokens it allows; every other logit of theirs becomes -inf.
2. Greedy rows (temperature 0) take the argmax of the penalized logits.
3. Other rows divide by their temperature, drop tokens outside top-k, the
   top-p nucleus and the min-p floor, and draw with Gumbel-max noise.

Seeded rows draw their randomness from a counter-based hash of
(seed, output position, token id) rather than from a shared generator, so a
request's samples do not depend on what else is in the batch. Penalties are
computed per row from that row's own history, so they keep this property.

Logprobs (``sample_tokens``) are the log-softmax of the logits after penalties
but before temperature and top-k/top-p/min-p filtering: the model's own
distribution, as OpenAI-style callers expect. They are computed only for the
rows that ask for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence

_MASK32 = 0xFFFFFFFF
_PAD = -1  # padding id of the history tensors, mapped to an extra, dropped vocab column


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # None: no logprobs; 0: the chosen token's only; n > 0: also the top n alternatives.
    logprobs: int | None = None
    # The same for every prompt token after the first (scoring a prompt); None: none.
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_history(self) -> bool:
        """True when a penalty is set, so sampling needs the prompt and output token ids."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


@dataclass
class TokenLogprobs:
    """Log-probability of one sampled token and of the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class SampleResult:
    """One step's picks: a token per row and, for rows that asked, its logprobs."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # per row; None when the row's params.logprobs is None


@dataclass
class SamplingBatch:
    """Per-row parameters of one step's batch as tensors on the logits' device."""

    temperature: torch.Tensor  # [B] float, 0 for greedy rows
    top_k: torch.Tensor  # [B] long, 0 = off
    top_p: torch.Tensor  # [B] float
    min_p: torch.Tensor  # [B] float
    seed: torch.Tensor  # [B] long
    position: torch.Tensor  # [B] long, index of the token being sampled
    # Penalties, only for the P rows that set one; all None when no row does.
    penalty_rows: torch.Tensor | None = None  # [P] long, row indices into the batch
    repetition_penalty: torch.Tensor | None = None  # [P, 1] float
    presence_penalty: torch.Tensor | None = None  # [P, 1] float
    frequency_penalty: torch.Tensor | None = None  # [P, 1] float
    output_ids: torch.Tensor | None = None  # [P, Lo] long, padded with -1
    # Prompt ids of rows with a repetition penalty (others all padding); None when no row has one.
    prompt_ids: torch.Tensor | None = None  # [P, Lp] long, padded with -1
    # Grammar-constrained rows (see grammar.py): only their allowed tokens may be picked; None when no row is.
    constrained_rows: torch.Tensor | None = None  # [R] long, row indices into the batch
    allowed: torch.Tensor | None = None  # [R, V] bool

    def constrain(self, rows: list[int], allowed: torch.Tensor) -> None:
        """Let rows `rows` pick only the tokens `allowed` [R, V] (bool, on the logits' device) marks."""
        self.constrained_rows = torch.tensor(rows, dtype=torch.long, device=allowed.device)
        self.allowed = allowed

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        seeds: list[int],
        positions: list[int],
        device: torch.device,
        *,
        prompt_token_ids: Sequence[Sequence[int] | None] | None = None,
        output_token_ids: Sequence[Sequence[int] | None] | None = None,
    ) -> SamplingBatch:
        """Tensors for one step of ``len(params)`` rows.

        ``prompt_token_ids`` and ``output_token_ids`` hold one entry per row (its
        prompt, and the tokens it generated so far); they are needed only when
        some row's ``needs_history`` is True, and the entries of the other rows
        are ignored (they may be empty or None).
        """

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        batch = cls(
            temperature=tensor([p.temperature for p in params], torch.float32),
            top_k=tensor([p.top_k for p in params], torch.long),
            top_p=tensor([p.top_p for p in params], torch.float32),
            min_p=tensor([p.min_p for p in params], torch.float32),
            seed=tensor([s & 0x7FFFFFFF for s in seeds], torch.long),
            position=tensor(positions, torch.long),
        )
        rows = [i for i, p in enumerate(params) if p.needs_history]
        if not rows:
            return batch
        if prompt_token_ids is None or output_token_ids is None:
            raise ValueError("prompt_token_ids and output_token_ids are required when a row sets a penalty")
        if len(prompt_token_ids) != len(params) or len(output_token_ids) != len(params):
            raise ValueError(f"need one prompt and one output history per row ({len(params)} rows)")
        penalized = [params[i] for i in rows]
        batch.penalty_rows = tensor(rows, torch.long)
        batch.repetition_penalty = tensor([[p.repetition_penalty] for p in penalized], torch.float32)
        batch.presence_penalty = tensor([[p.presence_penalty] for p in penalized], torch.float32)
        batch.frequency_penalty = tensor([[p.frequency_penalty] for p in penalized], torch.float32)
        batch.output_ids = _padded([output_token_ids[i] for i in rows], device)
        if any(p.repetition_penalty != 1.0 for p in penalized):
            batch.prompt_ids = _padded(
                [prompt_token_ids[i] if params[i].repetition_penalty != 1.0 else () for i in rows], device
            )
        return batch


def sample_tokens(logits: torch.Tensor, batch: SamplingBatch, params: list[SamplingParams]) -> SampleResult:
    """Pick one token per row of ``logits`` [B, V], with logprobs for the rows that ask.

    A row's logprobs are the log-softmax of its logits after penalties, before
    temperature and top-k/top-p/min-p filtering. ``params`` are the rows'
    parameters, in the order ``batch`` was built from.
    """
    logits = _penalize(logits, batch)  # [B, V]
    tokens = _pick(_constrain(logits, batch), batch)  # [B]
    token_ids = tokens.tolist()
    return SampleResult(token_ids=token_ids, logprobs=_logprobs(logits, tokens, token_ids, params))


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V], penalties and grammars included; returns [B] long."""
    return _pick(_constrain(_penalize(logits, batch), batch), batch)


def _constrain(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Logits [B, V] with the tokens a constrained row's grammar forbids at -inf (out of place: logprobs are
    reported from the unconstrained logits, the model's own distribution); unchanged when no row is constrained."""
    if batch.constrained_rows is None:
        return logits
    rows = logits.index_select(0, batch.constrained_rows).masked_fill(~batch.allowed, float("-inf"))
    return logits.index_copy(0, batch.constrained_rows, rows)


def _pick(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Greedy or seeded Gumbel-max choice per row of (penalized) ``logits`` [B, V]; returns [B] long."""
    greedy = logits.argmax(dim=-1)  # [B]
    if bool((batch.temperature == 0).all()):
        return greedy
    temperature = batch.temperature.clamp_min(1e-5).unsqueeze(1)  # [B, 1]
    logprobs = _filter(logits.float() / temperature, batch).log_softmax(dim=-1)  # [B, V]
    gumbel = -torch.log(-torch.log(_uniform(batch.seed, batch.position, logits.shape[1]))).float()
    sampled = (logprobs + gumbel).argmax(dim=-1)
    return torch.where(batch.temperature == 0, greedy, sampled)


def _penalize(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Logits [B, V] with each penalized row's penalties applied (float32); unchanged if none is."""
    if batch.penalty_rows is None:
        return logits
    logits = logits.float()
    vocab = logits.shape[1]
    rows = logits.index_select(0, batch.penalty_rows)  # [P, V]
    output_counts = _counts(batch.output_ids, vocab)  # [P, V]
    if batch.prompt_ids is not None:
        seen = (output_counts > 0) | (_counts(batch.prompt_ids, vocab) > 0)  # [P, V]
        r = batch.repetition_penalty  # [P, 1]
        rows = torch.where(seen, torch.where(rows > 0, rows / r, rows * r), rows)
    rows = rows - batch.presence_penalty * (output_counts > 0) - batch.frequency_penalty * output_counts
    return logits.index_copy(0, batch.penalty_rows, rows)  # out of place: the caller's logits stay intact


def _counts(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Occurrences [P, V] float of each token id in each row of ``ids`` [P, L] (padding -1 ignored)."""
    ids = ids.masked_fill(ids == _PAD, vocab)  # padding lands in an extra column, dropped below
    counts = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]


def _padded(sequences: list[Sequence[int] | None], device: torch.device) -> torch.Tensor:
    """Token id lists as one [P, max len] long tensor on ``device``, padded with -1."""
    rows = [torch.as_tensor(s if s is not None else (), dtype=torch.long) for s in sequences]
    return pad_sequence(rows, batch_first=True, padding_value=_PAD).to(device)


def _logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, token_ids: list[int], params: list[SamplingParams]
) -> list[TokenLogprobs | None]:
    """Per row: logprob of ``tokens`` [B] (``token_ids`` on the host) and the top-n alternatives under
    ``logits`` [B, V], or None when the row asked for none."""
    result: list[TokenLogprobs | None] = [None] * len(params)
    asked = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not asked:
        return result
    index = torch.tensor(asked, dtype=torch.long, device=logits.device)  # [A]
    logprobs = logits.index_select(0, index).float().log_softmax(dim=-1)  # [A, V]
    entries = token_logprobs(logprobs, tokens.index_select(0, index), [token_ids[i] for i in asked],
                             [params[i].logprobs for i in asked])
    for i, entry in zip(asked, entries):
        result[i] = entry
    return result


def token_logprobs(logprobs: torch.Tensor, ids: torch.Tensor, id_list: Sequence[int],
                   top: Sequence[int]) -> list[TokenLogprobs]:
    """Per row of `logprobs` [N, V]: the logprob of its token (`ids` [N] on the device, `id_list` the same on
    the host) and its `top[row]` most likely alternatives, best first."""
    chosen = logprobs.gather(1, ids.unsqueeze(1)).squeeze(1).tolist()  # [N]
    n = min(max(top), logprobs.shape[1])
    top_values: list[list[float]] = [[] for _ in id_list]
    top_ids: list[list[int]] = [[] for _ in id_list]
    if n > 0:
        values, best = logprobs.topk(n, dim=-1)  # [N, n] each, sorted best first
        top_values, top_ids = values.tolist(), best.tolist()
    return [TokenLogprobs(token_id=token, logprob=value, top=list(zip(top_ids[r][:k], top_values[r][:k])))
            for r, (token, value, k) in enumerate(zip(id_list, chosen, top))]


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
