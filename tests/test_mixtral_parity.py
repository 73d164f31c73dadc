"""Our Mixtral equals transformers' MixtralForCausalLM on the same tiny random weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from moemesh.worker.checkpoint import open_checkpoint
from moemesh.worker.models.registry import MODEL_REGISTRY, build_model
from tests.checkpoints import build_tiny_mixtral

PROMPT_LEN = 20
MAX_NEW_TOKENS = 64


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


def random_ids(length: int, seed: int = 1, vocab: int = 512) -> torch.Tensor:
    """Token ids [length] avoiding the special ids 0-2."""
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed))


def prefill(model, cache, ids: torch.Tensor, slot: int, start: int = 0) -> torch.Tensor:
    """Run ids [T] of one sequence at positions start.. into `slot`; logits [T, V]."""
    positions = torch.arange(start, start + len(ids))
    return model(ids[None], positions[None], torch.tensor([slot]), cache)[0]


def greedy_generate(model, prompt: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Prefill the prompt, then decode one token per forward (T=1) with the slot cache."""
    cache = model.make_cache(num_slots=1, max_len=len(prompt) + max_new_tokens)
    next_id = int(prefill(model, cache, prompt, slot=0)[-1].argmax())
    generated = [next_id]
    for position in range(len(prompt), len(prompt) + max_new_tokens - 1):
        logits = model(torch.tensor([[next_id]]), torch.tensor([[position]]), torch.tensor([0]), cache)
        next_id = int(logits[0, -1].argmax())
        generated.append(next_id)
    return generated


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def test_prefill_logits_match_transformers(model, hf_model):
    ids = random_ids(PROMPT_LEN)
    with torch.no_grad():
        expected = hf_model(ids[None]).logits[0]
    ours = prefill(model, model.make_cache(1, 64), ids, slot=0)
    assert ours.dtype == torch.float32
    assert ours.shape == (PROMPT_LEN, model.vocab_size)
    err = relative_error(ours, expected)
    assert err < 1e-4, f"prefill logits differ from transformers: relative error {err:.2e}"


def test_greedy_generation_matches_transformers_generate(model, hf_model):
    prompt = random_ids(PROMPT_LEN, seed=2)
    with torch.no_grad():
        expected = hf_model.generate(
            prompt[None], do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=None, pad_token_id=0
        )[0, PROMPT_LEN:].tolist()
    assert len(expected) == MAX_NEW_TOKENS, "transformers stopped early; the comparison needs 64 tokens"
    ours = greedy_generate(model, prompt, MAX_NEW_TOKENS)
    first_diff = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b), None)
    assert ours == expected, f"greedy tokens diverge from transformers at step {first_diff}"


def test_batched_decode_matches_each_sequence_alone(model):
    prompts = [random_ids(n, seed=10 + n) for n in (5, 9, 14)]
    slots = [2, 0, 3]
    next_ids = [[7, 11], [300, 42], [99, 128]]  # two decode steps per sequence

    alone = []
    for prompt, steps in zip(prompts, next_ids):
        cache = model.make_cache(num_slots=1, max_len=32)
        prefill(model, cache, prompt, slot=0)
        alone.append([prefill(model, cache, torch.tensor([t]), 0, start=len(prompt) + i)[0] for i, t in enumerate(steps)])

    cache = model.make_cache(num_slots=4, max_len=32)
    for prompt, slot in zip(prompts, slots):
        prefill(model, cache, prompt, slot)
    for step in range(2):
        ids = torch.tensor([[steps[step]] for steps in next_ids])  # [3, 1]
        positions = torch.tensor([[len(p) + step] for p in prompts])  # [3, 1]
        batched = model(ids, positions, torch.tensor(slots), cache)[:, 0]  # [3, V]
        for b in range(3):
            torch.testing.assert_close(
                batched[b], alone[b][step], rtol=1e-5, atol=1e-5,
                msg=lambda m, b=b, step=step: f"sequence {b}, decode step {step}: batched != alone\n{m}",
            )


def test_chunked_prefill_matches_one_shot_prefill(model):
    ids = random_ids(PROMPT_LEN, seed=3)
    whole = prefill(model, model.make_cache(1, 32), ids, slot=0)
    cache = model.make_cache(1, 32)
    first = prefill(model, cache, ids[:8], slot=0)
    rest = prefill(model, cache, ids[8:], slot=0, start=8)
    torch.testing.assert_close(torch.cat([first, rest]), whole, rtol=1e-5, atol=1e-5)


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
    expected = prefill(model, model.make_cache(1, 32), ids, slot=0)
    assert torch.equal(prefill(sharded, sharded.make_cache(1, 32), ids, slot=0), expected)


def test_fused_expert_names_of_transformers_state_dict_load_the_same(model, hf_model, ckpt_dir, tmp_path):
    # transformers >= 5 keeps experts fused in memory (mlp.experts.gate_up_proj);
    # a state dict saved as-is carries those names instead of per-expert ones.
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    shutil.copy(ckpt_dir / "config.json", fused_dir / "config.json")
    state = {name: t.contiguous() for name, t in hf_model.state_dict().items()}
    assert any(name.endswith("mlp.experts.gate_up_proj") for name in state)
    save_file(state, fused_dir / "model.safetensors")
    fused = build_model(open_checkpoint(fused_dir))
    ids = random_ids(PROMPT_LEN)
    expected = prefill(model, model.make_cache(1, 32), ids, slot=0)
    assert torch.equal(prefill(fused, fused.make_cache(1, 32), ids, slot=0), expected)


def test_bf16_checkpoint_is_cast_to_the_requested_dtype(tmp_path):
    from transformers import MixtralForCausalLM

    bf16_dir = build_tiny_mixtral(tmp_path / "bf16", seed=5, save_dtype=torch.bfloat16)
    ours = build_model(open_checkpoint(bf16_dir), dtype=torch.float32)
    assert ours.layers[0].moe.experts.w13.dtype == torch.float32
    reference = MixtralForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32).eval()
    ids = random_ids(PROMPT_LEN)
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    err = relative_error(prefill(ours, ours.make_cache(1, 32), ids, slot=0), expected)
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


def test_position_beyond_the_cache_is_rejected(model):
    cache = model.make_cache(num_slots=1, max_len=8)
    with pytest.raises(ValueError, match="cache length 8"):
        prefill(model, cache, random_ids(9), slot=0)


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
    err = relative_error(prefill(ours, ours.make_cache(1, 32), ids, slot=0), expected)
    assert err < 1e-4, f"{overrides}: logits differ from transformers: relative error {err:.2e}"
