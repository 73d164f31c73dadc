"""Our Mixtral equals transformers' MixtralForCausalLM on the same tiny random weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from moemesh.worker.models.checkpoint import open_checkpoint
from moemesh.worker.models.registry import MODEL_REGISTRY, build_model
from tests.support.checkpoints import build_tiny_mixtral
from tests.support.model_contract import (
    PROMPT_LEN,
    CpuModelContract,
    new_cache,
    prefill,
    random_ids,
    relative_error,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machine's cores are shared: stay on one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return build_tiny_mixtral(tmp_path_factory.mktemp("tiny-mixtral"), seed=0)


@pytest.fixture(scope="module")
def model(ckpt_dir):
    return build_model(open_checkpoint(ckpt_dir))


@pytest.fixture(scope="module")
def hf_model(ckpt_dir):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32).eval()


def test_prefill_logits_match_transformers(model, hf_model):
    ids = random_ids(PROMPT_LEN)
    with torch.no_grad():
        expected = hf_model(ids[None]).logits[0]
    ours = prefill(model, new_cache(model), ids)
    assert ours.dtype == torch.float32
    assert ours.shape == (PROMPT_LEN, model.vocab_size)
    err = relative_error(ours, expected)
    assert err < 1e-4, f"prefill logits differ from transformers: relative error {err:.2e}"


def test_experts_split_across_shards_sum_to_the_whole(model):
    moe = model.layers[0].moe
    hidden = torch.randn(12, model.args.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        topk_ids, topk_weights = moe.route(hidden)
        whole = moe.run_experts(hidden, topk_ids, topk_weights)
        parts = [moe.run_experts(hidden, topk_ids, topk_weights, expert_ids=ids) for ids in ([0, 2], [1], [3])]
    assert topk_ids.shape == topk_weights.shape == (12, model.args.num_experts_per_tok)
    torch.testing.assert_close(topk_weights.sum(-1), torch.ones(12))
    torch.testing.assert_close(sum(parts), whole, rtol=1e-5, atol=1e-6)


def test_sharded_checkpoint_loads_the_same(model, tmp_path):
    sharded_dir = build_tiny_mixtral(tmp_path / "sharded", seed=0, max_shard_size="100KB")
    assert (sharded_dir / "model.safetensors.index.json").is_file(), "max_shard_size did not force shards"
    sharded = build_model(open_checkpoint(sharded_dir))
    assert len(open_checkpoint(sharded_dir).weight_files) > 1
    ids = random_ids(PROMPT_LEN)
    expected = prefill(model, new_cache(model), ids)
    assert torch.equal(prefill(sharded, new_cache(sharded), ids), expected)


def test_bf16_checkpoint_is_cast_to_the_requested_dtype(tmp_path):
    from transformers import MixtralForCausalLM

    bf16_dir = build_tiny_mixtral(tmp_path / "bf16", seed=5, save_dtype=torch.bfloat16)
    ours = build_model(open_checkpoint(bf16_dir), dtype=torch.float32)
    assert ours.layers[0].moe.experts.w13.dtype == torch.float32
    reference = MixtralForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32).eval()
    ids = random_ids(PROMPT_LEN)
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    err = relative_error(prefill(ours, new_cache(ours), ids), expected)
    assert err < 1e-4, f"bf16 checkpoint loaded as fp32 differs from transformers: relative error {err:.2e}"


def test_unknown_architecture_is_rejected_by_name(ckpt_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(ckpt_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["FancyNewMoEForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="FancyNewMoEForCausalLM") as excinfo:
        build_model(open_checkpoint(other))
    assert all(name in str(excinfo.value) for name in MODEL_REGISTRY), "the error should list supported ones"


def test_position_beyond_the_block_table_is_rejected(model):
    cache = new_cache(model, 16, block_size=4)
    with pytest.raises(ValueError, match="block table covers 8 positions"):
        prefill(model, cache, random_ids(9), blocks=[0, 1])


def test_model_reports_its_shape(model):
    assert (model.num_layers, model.vocab_size, model.max_context_tokens) == (2, 512, 256)


@pytest.mark.parametrize(
    "overrides",
    [{"tie_word_embeddings": True}, {"sliding_window": 6}, {"head_dim": 32, "rope_theta": 10000.0}],
    ids=["tied-embeddings", "sliding-window", "wide-heads"],
)
def test_config_variants_match_transformers(overrides, tmp_path):
    from transformers import MixtralForCausalLM

    variant_dir = build_tiny_mixtral(tmp_path / "variant", seed=6, **overrides)
    ours = build_model(open_checkpoint(variant_dir))
    reference = MixtralForCausalLM.from_pretrained(variant_dir, dtype=torch.float32).eval()
    ids = random_ids(PROMPT_LEN, seed=7)
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    err = relative_error(prefill(ours, new_cache(ours), ids), expected)
    assert err < 1e-4, f"{overrides}: logits differ from transformers: relative error {err:.2e}"


class TestMixtralContract(CpuModelContract):
    """The shared model contract, on the tiny Mixtral."""
