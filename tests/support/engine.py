"""Requests for the engine tests, and running them to the end."""

from __future__ import annotations

import torch

from moemesh.worker.engine.engine import Engine
from moemesh.worker.engine.requests import GenerationRequest
from moemesh.worker.engine.sampling import SamplingParams


def request(rid: str, prompt: list[int], **params) -> GenerationRequest:
    """A greedy request ignoring EOS unless `params` say otherwise; `deadline` and `grammar` are the request's
    own fields."""
    deadline, grammar = params.pop("deadline", None), params.pop("grammar", None)
    params.setdefault("temperature", 0.0)
    params.setdefault("ignore_eos", True)
    return GenerationRequest(rid, tuple(prompt), SamplingParams(**params), deadline=deadline, grammar=grammar)


def new_result() -> dict:
    """An empty record of one request's output."""
    return {"ids": [], "text": "", "finish": None, "usage": None, "logprobs": [], "prompt_logprobs": []}


def record(results: dict, out) -> None:
    """Add one step's output of a request to its record (which must not have finished yet)."""
    result = results.setdefault(out.request_id, new_result())
    assert result["finish"] is None, f"{out.request_id} reported after it finished"
    result["ids"] += out.token_ids
    result["text"] += out.text
    result["logprobs"] += out.logprobs
    result["prompt_logprobs"] += out.prompt_logprobs
    if out.finish_reason:
        result["finish"] = out.finish_reason
        result["usage"] = (out.prompt_tokens, out.completion_tokens, out.cached_tokens)


def run(engine: Engine, requests: list[GenerationRequest], max_steps: int = 2000) -> dict:
    """Add `requests`, step until the engine is idle, and gather each request's output."""
    results = {r.request_id: new_result() for r in requests}
    for r in requests:
        engine.add(r)
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for out in engine.step():
            record(results, out)
    assert not engine.has_work(), f"the engine did not drain in {max_steps} steps"
    return results


def random_prompt(length: int, seed: int) -> list[int]:
    """`length` token ids (3..499), the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (length,), generator=g).tolist()
