"""Fixtures of the model tests: a tiny random Mixtral checkpoint, its fp32 CPU model, its tokenizer, engines.

Module-scoped: each test module gets its own, built once; a module or class
that needs another model (a family, a device, a dtype) overrides `model`.
"""

from __future__ import annotations

import pytest
import torch

from moemesh.worker.engine.engine import Engine
from moemesh.worker.engine.tokenizer import Tokenizer
from moemesh.worker.models.checkpoint import open_checkpoint
from moemesh.worker.models.registry import build_model
from tests.support.checkpoints import build_tiny_mixtral


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return build_tiny_mixtral(tmp_path_factory.mktemp("tiny-mixtral"), seed=3)


@pytest.fixture(scope="module")
def model(checkpoint_dir):
    return build_model(open_checkpoint(checkpoint_dir), dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(checkpoint_dir):
    return Tokenizer.from_dir(checkpoint_dir)


@pytest.fixture
def engine(model, tokenizer):
    """An engine of 8 sequence slots and 256 positions on `model`."""
    return Engine(model, tokenizer, max_num_seqs=8, max_model_len=256)


@pytest.fixture
def make_engine(model, tokenizer):
    """A maker of engines on `model` (4 slots, 128 positions unless the options say otherwise)."""
    def make(**options) -> Engine:
        options.setdefault("max_num_seqs", 4)
        options.setdefault("max_model_len", 128)
        return Engine(model, tokenizer, **options)

    return make
