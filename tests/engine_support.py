"""What the engine test modules share: a tiny random Mixtral, its model and tokenizer, and a request maker.

A test module imports the fixture functions below (they register under the names `checkpoint_dir`,
`model` and `tokenizer`); pytest builds them once per module.
"""

from __future__ import annotations

import pytest
import torch

from moemesh.worker.engine.requests import GenerationRequest
from moemesh.worker.engine.sampling import SamplingParams
from moemesh.worker.engine.tokenizer import Tokenizer
from moemesh.worker.models.checkpoint import open_checkpoint
from moemesh.worker.models.registry import build_model
from tests.checkpoints import build_tiny_mixtral


@pytest.fixture(scope="module", name="checkpoint_dir")
def checkpoint_dir_fixture(tmp_path_factory):
    return build_tiny_mixtral(tmp_path_factory.mktemp("tiny-mixtral"), seed=3)


@pytest.fixture(scope="module", name="model")
def model_fixture(checkpoint_dir):
    return build_model(open_checkpoint(checkpoint_dir), dtype=torch.float32)


@pytest.fixture(scope="module", name="tokenizer")
def tokenizer_fixture(checkpoint_dir):
    return Tokenizer.from_dir(checkpoint_dir)


def request(rid: str, prompt: list[int], **params) -> GenerationRequest:
    """A greedy request ignoring EOS unless `params` say otherwise; `deadline` is the request's own field."""
    deadline = params.pop("deadline", None)
    params.setdefault("temperature", 0.0)
    params.setdefault("ignore_eos", True)
    return GenerationRequest(rid, tuple(prompt), SamplingParams(**params), deadline=deadline)
