"""Fixtures of the model tests: tiny random checkpoints, models, tokenizers and engines.

The engine tests use a tiny Mixtral (`checkpoint_dir`, `model`, `tokenizer`,
`engine`, `make_engine`); the parity tests one checkpoint per family
(`family`, `ckpt_dir`) and define their own `model` and `hf_model` (device,
dtype). Module-scoped: each test module gets its own, built once; a module or
class that needs another model overrides `model`.
"""

from __future__ import annotations

import pytest
import torch

from moemesh.worker.engine.engine import Engine
from moemesh.worker.engine.tokenizer import Tokenizer
from moemesh.worker.models.checkpoint import open_checkpoint
from moemesh.worker.models.registry import build_model
from tests.support.checkpoints import FAMILIES, Family, build_tiny_mixtral


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


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> Family:
    """Each model family in turn (Mixtral, Qwen2-MoE, Qwen3-MoE)."""
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def ckpt_dir(family, tmp_path_factory):
    """The family's tiny random checkpoint."""
    return family.build(tmp_path_factory.mktemp(f"tiny-{family.name}"), seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """The test machine's cores are shared: a module using this stays on one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
