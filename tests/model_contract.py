"""Model behaviour every family must show, run by each family's parity module.

A parity module imports the tests below; pytest runs them there against that
module's `model` and `hf_model` fixtures (our model and the `transformers`
one, loaded from the same tiny random checkpoint).
"""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import save_file

from moemesh.worker.checkpoint import open_checkpoint
from moemesh.worker.models.registry import build_model

PROMPT_LEN = 20
MAX_NEW_TOKENS = 64


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


def test_greedy_generation_matches_transformers_generate(model, hf_model):
    prompt = random_ids(PROMPT_LEN, seed=2)
    with torch.no_grad():
        expected = hf_model.generate(
            prompt[None], do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=None, pad_token_id=0
        )[0, PROMPT_LEN:].tolist()
    assert len(expected) == MAX_NEW_TOKENS, "transformers stopped early; the comparison needs 64 tokens"
    assert len(set(expected)) > 4, "reference output is degenerate; the comparison would prove little"
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


def test_fused_expert_names_of_transformers_state_dict_load_the_same(model, hf_model, ckpt_dir, tmp_path):
    # save_pretrained writes one matrix per expert (mlp.experts.{e}.gate_proj);
    # transformers >= 5 keeps them fused in memory, and a state dict saved as-is
    # carries those names (mlp.experts.gate_up_proj) instead.
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
