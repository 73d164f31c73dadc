"""Opening checkpoint directories: metadata, revision, tensors, and loading errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moemesh.worker.models.checkpoint import iter_tensors, open_checkpoint
from moemesh.worker.models.registry import build_model
from tests.support.checkpoints import build_tiny_mixtral


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return build_tiny_mixtral(tmp_path_factory.mktemp("tiny-mixtral"), seed=0)


@pytest.fixture
def ckpt_copy(ckpt_dir, tmp_path):
    """A private copy that a test may damage."""
    return shutil.copytree(ckpt_dir, tmp_path / "copy")


def test_metadata_comes_from_the_checkpoint_files(ckpt_dir):
    ckpt = open_checkpoint(ckpt_dir)
    assert ckpt.architecture == "MixtralForCausalLM"
    assert ckpt.model_id == ckpt_dir.name, "the model id defaults to the directory name"
    assert ckpt.max_context_tokens == 256
    assert ckpt.config["num_local_experts"] == 4
    assert ckpt.generation_defaults["eos_token_id"] == 2
    assert "transformers_version" not in ckpt.generation_defaults
    assert open_checkpoint(ckpt_dir, model_id="tiny").model_id == "tiny"


def test_missing_config_is_a_clear_error(ckpt_copy):
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(ValueError, match="has no config.json"):
        open_checkpoint(ckpt_copy)


def test_missing_weights_are_a_clear_error(ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no weights: expected model.safetensors"):
        open_checkpoint(ckpt_copy)


def test_a_path_that_is_not_a_directory_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        open_checkpoint(tmp_path / "nowhere")


def test_revision_is_stable_and_follows_the_content(ckpt_dir, tmp_path):
    revision = open_checkpoint(ckpt_dir).revision
    assert open_checkpoint(ckpt_dir).revision == revision, "same files, same revision"
    copy = shutil.copytree(ckpt_dir, tmp_path / "elsewhere")
    assert open_checkpoint(copy).revision == revision, "a copy elsewhere serves the same weights"


def test_revision_changes_when_weights_change(ckpt_dir, tmp_path):
    redrawn = build_tiny_mixtral(tmp_path / "redrawn", seed=1)  # same shapes, other values
    assert (redrawn / "model.safetensors").stat().st_size == (ckpt_dir / "model.safetensors").stat().st_size
    assert open_checkpoint(redrawn).revision != open_checkpoint(ckpt_dir).revision


@pytest.mark.parametrize("name", ["tokenizer.json", "generation_config.json"])
def test_revision_changes_when_the_tokenizer_or_sampling_defaults_change(ckpt_copy, ckpt_dir, name):
    # Caches key answers by revision: another tokenizer or default sampling gives other answers.
    path = ckpt_copy / name
    path.write_text(path.read_text().replace("{", '{"_edited": 1, ', 1) if path.exists() else '{"top_k": 5}')
    assert open_checkpoint(ckpt_copy).revision != open_checkpoint(ckpt_dir).revision


def test_revision_changes_when_config_changes(ckpt_copy, ckpt_dir):
    config = json.loads((ckpt_copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-6
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    assert open_checkpoint(ckpt_copy).revision != open_checkpoint(ckpt_dir).revision


def test_sharded_and_single_file_checkpoints_hold_the_same_tensors(ckpt_dir, tmp_path):
    sharded = build_tiny_mixtral(tmp_path / "sharded", seed=0, max_shard_size="100KB")
    sharded_ckpt = open_checkpoint(sharded)
    assert len(sharded_ckpt.weight_files) > 1
    single = dict(iter_tensors(open_checkpoint(ckpt_dir)))
    pieces = dict(iter_tensors(sharded_ckpt))
    assert pieces.keys() == single.keys()
    assert all(torch.equal(pieces[name], single[name]) for name in single)


def test_index_naming_a_missing_shard_is_rejected(tmp_path):
    sharded = build_tiny_mixtral(tmp_path / "sharded", seed=0, max_shard_size="100KB")
    victim = sorted(sharded.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(ValueError, match=victim.name):
        open_checkpoint(sharded)


def test_checkpoint_missing_an_expert_is_rejected_naming_the_parameter(ckpt_copy):
    tensors = load_file(ckpt_copy / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, ckpt_copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"layers\.1\.moe\.experts\.w2"):
        build_model(open_checkpoint(ckpt_copy))


def test_unknown_checkpoint_tensor_is_rejected_by_name(ckpt_copy):
    tensors = load_file(ckpt_copy / "model.safetensors")
    tensors["model.layers.0.mystery.weight"] = torch.zeros(3)
    save_file(tensors, ckpt_copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mystery\.weight"):
        build_model(open_checkpoint(ckpt_copy))


def test_tensor_of_the_wrong_shape_is_rejected(ckpt_copy):
    tensors = load_file(ckpt_copy / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, ckpt_copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.norm\.weight has shape \(65,\)"):
        build_model(open_checkpoint(ckpt_copy))
