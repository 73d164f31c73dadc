"""Our model families equal transformers' implementations on the same tiny random weights (float32, CPU).

Every test that takes `model` runs once per family: Mixtral; Qwen2-MoE with a
shared expert and a dense layer (mlp_only_layers=[1]); Qwen3-MoE with q/k
norms and a head_dim that is not hidden_size / heads.
"""

from __future__ import annotations

import json

import pytest
import torch

from moemesh.worker.models.checkpoint import open_checkpoint
from moemesh.worker.models.layers import SparseMoeBlock, SwiGLUMLP
from moemesh.worker.models.qwen2_moe import Qwen2MoeArgs, Qwen2MoeSparseMoeBlock
from moemesh.worker.models.qwen3_moe import Qwen3MoeArgs
from moemesh.worker.models.registry import MODEL_REGISTRY, build_model
from tests.support.checkpoints import FAMILIES, build_tiny_mixtral, build_tiny_qwen2_moe, build_tiny_qwen3_moe
from tests.support.model_contract import (
    PROMPT_LEN,
    CpuModelContract,
    new_cache,
    prefill,
    random_ids,
    reference_logits,
    relative_error,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(ckpt_dir):
    return build_model(open_checkpoint(ckpt_dir))


@pytest.fixture(scope="module")
def hf_model(family, ckpt_dir):
    return family.reference(ckpt_dir)


class TestModelContract(CpuModelContract):
    """The shared model contract, on each family."""


def first_sparse_block(model) -> SparseMoeBlock:
    return next(module for module in model.modules() if isinstance(module, SparseMoeBlock))


def test_checkpoint_builds_our_model_of_its_family(model, family):
    assert type(model).__name__ == family.architecture


def test_model_reports_its_shape(model, ckpt_dir):
    config = json.loads((ckpt_dir / "config.json").read_text())
    shape = (config["num_hidden_layers"], config["vocab_size"], config["max_position_embeddings"])
    assert (model.num_layers, model.vocab_size, model.max_context_tokens) == shape


def test_experts_split_across_shards_sum_to_the_whole(model):
    moe = first_sparse_block(model)
    num_experts = model.args.num_experts
    hidden = torch.randn(12, model.args.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        topk_ids, topk_weights = moe.route(hidden)
        whole = moe.run_experts(hidden, topk_ids, topk_weights)
        parts = [moe.run_experts(hidden, topk_ids, topk_weights, expert_ids=range(e, num_experts, 3)) for e in range(3)]
        routed_and_shared = whole + (moe.run_shared_expert(hidden) if isinstance(moe, Qwen2MoeSparseMoeBlock) else 0)
        full = moe(hidden)
    assert topk_ids.shape == topk_weights.shape == (12, model.args.num_experts_per_tok)
    if getattr(model.args, "norm_topk_prob", True):  # Mixtral always renormalizes
        torch.testing.assert_close(topk_weights.sum(-1), torch.ones(12))
    else:
        assert bool((topk_weights.sum(-1) < 1).all()), "without norm_topk_prob the top-k weights must not be renormalized"
    torch.testing.assert_close(sum(parts), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full, routed_and_shared, rtol=0, atol=0, msg="forward != run_experts(route) (+ shared)")


def test_sharded_checkpoint_loads_the_same(model, family, tmp_path):
    sharded_dir = family.build(tmp_path / "sharded", seed=0, max_shard_size="100KB")
    assert (sharded_dir / "model.safetensors.index.json").is_file(), "max_shard_size did not force shards"
    assert len(open_checkpoint(sharded_dir).weight_files) > 1, "max_shard_size did not force shards"
    sharded = build_model(open_checkpoint(sharded_dir))
    ids = random_ids(PROMPT_LEN)
    expected = prefill(model, new_cache(model), ids)
    assert torch.equal(prefill(sharded, new_cache(sharded), ids), expected)


def test_position_beyond_the_block_table_is_rejected(model):
    cache = new_cache(model, 16, block_size=4)
    with pytest.raises(ValueError, match="block table covers 8 positions"):
        prefill(model, cache, random_ids(9), blocks=[0, 1])


VARIANTS = [
    ("mixtral", {"tie_word_embeddings": True}),
    ("mixtral", {"sliding_window": 6}),
    ("mixtral", {"head_dim": 32, "rope_theta": 10000.0}),
    ("qwen2_moe", {"tie_word_embeddings": True, "norm_topk_prob": True}),
    ("qwen2_moe", {"decoder_sparse_step": 2, "mlp_only_layers": []}),
    # transformers slides every other layer below max_window_layers: here layer 0 only
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 2}),
    ("qwen2_moe", {"qkv_bias": False, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 6}),
    ("qwen3_moe", {"attention_bias": True, "mlp_only_layers": [0], "norm_topk_prob": False}),
    ("qwen3_moe", {"tie_word_embeddings": True, "head_dim": 16, "num_key_value_heads": 4}),
]


@pytest.mark.parametrize(("family_name", "overrides"), VARIANTS, ids=[f"{f}-{'-'.join(o)}" for f, o in VARIANTS])
def test_config_variants_match_transformers(family_name, overrides, tmp_path):
    family = FAMILIES[family_name]
    variant_dir = family.build(tmp_path / "variant", seed=6, **overrides)
    ours = build_model(open_checkpoint(variant_dir))
    ids = random_ids(PROMPT_LEN, seed=7)
    expected = reference_logits(family.reference(variant_dir), ids)
    err = relative_error(prefill(ours, new_cache(ours), ids), expected)
    assert err < 1e-4, f"{family_name} {overrides}: logits differ from transformers: relative error {err:.2e}"


def test_bf16_checkpoint_is_cast_to_the_requested_dtype(tmp_path):
    bf16_dir = build_tiny_mixtral(tmp_path / "bf16", seed=5, save_dtype=torch.bfloat16)
    ours = build_model(open_checkpoint(bf16_dir), dtype=torch.float32)
    assert ours.layers[0].moe.experts.w13.dtype == torch.float32
    ids = random_ids(PROMPT_LEN)
    expected = reference_logits(FAMILIES["mixtral"].reference(bf16_dir, torch.float32), ids)
    err = relative_error(prefill(ours, new_cache(ours), ids), expected)
    assert err < 1e-4, f"bf16 checkpoint loaded as fp32 differs from transformers: relative error {err:.2e}"


def test_unknown_architecture_is_rejected_by_name(tmp_path):
    other = build_tiny_mixtral(tmp_path / "other", seed=0)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["FancyNewMoEForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="FancyNewMoEForCausalLM") as excinfo:
        build_model(open_checkpoint(other))
    assert all(name in str(excinfo.value) for name in MODEL_REGISTRY), "the error should list supported ones"


def test_mlp_only_layers_get_a_dense_mlp(tmp_path):
    qwen2 = build_model(open_checkpoint(build_tiny_qwen2_moe(tmp_path / "q2", seed=0)))
    assert [type(layer.mlp) for layer in qwen2.layers] == [Qwen2MoeSparseMoeBlock, SwiGLUMLP, Qwen2MoeSparseMoeBlock]
    qwen3 = build_model(open_checkpoint(build_tiny_qwen3_moe(tmp_path / "q3", seed=0, decoder_sparse_step=2)))
    assert [type(layer.mlp) for layer in qwen3.layers] == [SwiGLUMLP, SparseMoeBlock], "only every 2nd layer is sparse"


def test_published_and_saved_expert_count_names_read_the_same():
    # Published Qwen3-MoE configs say num_experts; transformers 5 saves the alias num_local_experts.
    base = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256,
    )
    published = Qwen3MoeArgs.from_config(base | {"num_experts": 8})
    saved = Qwen3MoeArgs.from_config(base | {"num_local_experts": 8})
    assert published == saved
    assert published.num_experts == 8


def test_missing_moe_field_is_named_in_the_error():
    config = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=256, shared_expert_intermediate_size=96,
    )
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        Qwen2MoeArgs.from_config(config)
    with pytest.raises(ValueError, match="decoder_sparse_step"):
        Qwen2MoeArgs.from_config(config | {"moe_intermediate_size": 32, "decoder_sparse_step": 0})
