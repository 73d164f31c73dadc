"""Model behaviour every family must show, run by each family's parity module, and the helpers its tests use.

A parity module subclasses `ModelContract` (any device) or `CpuModelContract`
(adds the CPU's weight layouts) in a class named Test...; pytest runs the
inherited tests there against that module's `model`, `hf_model` and
`ckpt_dir` fixtures (our model and the `transformers` one, loaded from the
same tiny random checkpoint).
"""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import save_file

from moemesh.worker.models.batch import ForwardBatch, SequenceChunk
from moemesh.worker.models.checkpoint import open_checkpoint
from moemesh.worker.models.layers import Linear, MoEExperts
from moemesh.worker.models.registry import build_model
from moemesh.worker.ops import native

PROMPT_LEN = 20
MAX_NEW_TOKENS = 64


def random_ids(length: int, seed: int = 1, vocab: int = 512) -> torch.Tensor:
    """Token ids [length] avoiding the special ids 0-2."""
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed))


BLOCK_SIZE = 4  # small, so that every test sequence spans several blocks


def new_cache(model, tokens: int = 128, block_size: int = BLOCK_SIZE):
    """A paged cache with room for `tokens` positions."""
    return model.make_cache(num_blocks=-(-tokens // block_size), block_size=block_size)


def forward(model, cache, chunks: list[SequenceChunk], all_logits: bool = False) -> torch.Tensor:
    """One forward call over `chunks`, on the cache's device."""
    batch = ForwardBatch.build(chunks, cache.block_size, model.layer_windows, cache.k[0].device, all_logits=all_logits)
    return model(batch, cache)


def prefill(model, cache, ids: torch.Tensor, start: int = 0, blocks: list[int] | None = None) -> torch.Tensor:
    """Run ids [T] of one sequence at positions start.. (blocks: its block table, default the whole pool); logits [T, V]."""
    table = list(range(cache.num_blocks)) if blocks is None else blocks
    return forward(model, cache, [SequenceChunk(ids.tolist(), start, table)], all_logits=True)


def greedy_generate(model, prompt: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Prefill the prompt, then decode one token per forward (T=1) with the paged cache."""
    cache = new_cache(model, len(prompt) + max_new_tokens)
    next_id = int(prefill(model, cache, prompt)[-1].argmax())
    generated = [next_id]
    for position in range(len(prompt), len(prompt) + max_new_tokens - 1):
        next_id = int(prefill(model, cache, torch.tensor([next_id]), start=position)[-1].argmax())
        generated.append(next_id)
    return generated


def reference_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    """transformers' float32 logits [T, V] for ids [T], on its device."""
    with torch.no_grad():
        return hf_model(ids[None].to(hf_model.device)).logits[0].float()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def prefill_and_decode(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a prompt's prefill, and of one decode step over four sequences (a few rows per expert)."""
    ids = random_ids(PROMPT_LEN, seed=6)
    whole = prefill(model, new_cache(model), ids)
    cache = new_cache(model, 64)
    prompts = [random_ids(n, seed=30 + n) for n in (3, 6, 9, 4)]
    tables = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    for prompt, table in zip(prompts, tables):
        prefill(model, cache, prompt, blocks=table)
    step = forward(model, cache, [SequenceChunk([17], len(p), t) for p, t in zip(prompts, tables)])
    return whole, step


def without_native_kernels(monkeypatch) -> None:
    """Make every model built from now on choose the portable backends, as on a machine without a C compiler."""
    monkeypatch.setattr(native, "load_kernels", lambda: native.Kernels(None, "turned off by the test"))


def panels_checked_against_plain_weights(model, plain) -> int:
    """How many modules of `model` hold panels, each asserted to unpack exactly to the weights of `plain`."""
    plain_modules, checked = dict(plain.named_modules()), 0
    for name, module in model.named_modules():
        if isinstance(module, MoEExperts) and module.backend.panels is not None:
            w13, w2 = native.unpack_experts(*module.backend.panels)
            reference = plain_modules[name]
            assert torch.equal(w13, reference.w13) and torch.equal(w2, reference.w2), f"{name}: panels != weights"
            checked += 1
        elif isinstance(module, Linear) and module.backend.panels is not None:
            unpacked = native.unpack_linear(module.backend.panels)
            assert torch.equal(unpacked, plain_modules[name].weight), f"{name}: panels != weight"
            checked += 1
    return checked


class ModelContract:
    """Behaviour every model family shows on any device.

    A parity module subclasses it (in a class named Test...) and provides the fixtures `model` and `hf_model`:
    ours and transformers', from the same checkpoint.
    """

    def test_prefill_logits_match_transformers(self, model, hf_model):
        ids = random_ids(PROMPT_LEN)
        ours = prefill(model, new_cache(model), ids)
        assert ours.dtype == torch.float32 and ours.device == hf_model.device
        assert ours.shape == (PROMPT_LEN, model.vocab_size)
        err = relative_error(ours, reference_logits(hf_model, ids))
        assert err < 1e-4, f"prefill logits differ from transformers: relative error {err:.2e}"

    def test_greedy_generation_matches_transformers_generate(self, model, hf_model):
        prompt = random_ids(PROMPT_LEN, seed=2)
        with torch.no_grad():
            expected = hf_model.generate(prompt[None].to(hf_model.device), do_sample=False,
                                         max_new_tokens=MAX_NEW_TOKENS, eos_token_id=None, pad_token_id=0)
        expected = expected[0, PROMPT_LEN:].tolist()
        assert len(expected) == MAX_NEW_TOKENS, "transformers stopped early; the comparison needs 64 tokens"
        assert len(set(expected)) > 4, "reference output is degenerate; the comparison would prove little"
        ours = greedy_generate(model, prompt, MAX_NEW_TOKENS)
        first_diff = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b), None)
        assert ours == expected, f"greedy tokens diverge from transformers at step {first_diff}"

    def test_batched_decode_matches_each_sequence_alone(self, model):
        prompts = [random_ids(n, seed=10 + n) for n in (5, 9, 14)]
        tables = [[3, 0], [5, 1, 6], [2, 7, 4, 8]]  # interleaved, out-of-order blocks of one shared pool
        next_ids = [[7, 11], [300, 42], [99, 128]]  # two decode steps per sequence

        alone = []
        for prompt, steps in zip(prompts, next_ids):
            cache = new_cache(model, 32)
            prefill(model, cache, prompt)
            alone.append([prefill(model, cache, torch.tensor([t]), start=len(prompt) + i)[0] for i, t in enumerate(steps)])

        cache = new_cache(model, 40)
        for prompt, table in zip(prompts, tables):
            prefill(model, cache, prompt, blocks=table)
        for step in range(2):
            chunks = [SequenceChunk([steps[step]], len(p) + step, t) for p, steps, t in zip(prompts, next_ids, tables)]
            batched = forward(model, cache, chunks)  # [3, V]
            for b in range(3):
                torch.testing.assert_close(
                    batched[b], alone[b][step], rtol=1e-5, atol=1e-5,
                    msg=lambda m, b=b, step=step: f"sequence {b}, decode step {step}: batched != alone\n{m}",
                )

    def test_mixed_prefill_chunks_and_decodes_in_one_forward_match_separate_calls(self, model):
        cache = new_cache(model, 64)
        decoding = random_ids(9, seed=20)
        prefill(model, cache, decoding, blocks=[0, 1, 2])
        long_prompt = random_ids(13, seed=21)
        prefill(model, cache, long_prompt[:6], blocks=[3, 4, 5, 6])  # first chunk of a chunked prefill
        other = random_ids(7, seed=22)
        expected = [
            prefill(model, new_cache(model, 16), torch.cat([decoding, torch.tensor([5])]))[-1],
            prefill(model, new_cache(model, 16), long_prompt)[-1],
            prefill(model, new_cache(model, 16), other)[-1],
        ]
        chunks = [
            SequenceChunk([5], 9, [0, 1, 2]),
            SequenceChunk(long_prompt[6:].tolist(), 6, [3, 4, 5, 6]),
            SequenceChunk(other.tolist(), 0, [7, 8]),
        ]
        got = forward(model, cache, chunks)
        assert got.shape[0] == 3, "one row of logits per chunk, in chunk order"
        for i in range(3):
            torch.testing.assert_close(got[i], expected[i], rtol=1e-5, atol=1e-5)

    def test_chunked_prefill_matches_one_shot_prefill(self, model):
        ids = random_ids(PROMPT_LEN, seed=3)
        whole = prefill(model, new_cache(model, 32), ids)
        cache = new_cache(model, 32)
        first = prefill(model, cache, ids[:8])
        rest = prefill(model, cache, ids[8:], start=8)
        torch.testing.assert_close(torch.cat([first, rest]), whole, rtol=1e-5, atol=1e-5)


class CpuModelContract(ModelContract):
    """What the CPU path adds: packed and native-kernel weights, bfloat16 packing, and transformers' fused expert names."""

    def test_fused_expert_names_of_transformers_state_dict_load_the_same(self, model, hf_model, ckpt_dir, tmp_path):
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
        expected = prefill(model, new_cache(model), ids)
        assert torch.equal(prefill(fused, new_cache(fused), ids), expected)

    def test_native_kernels_and_packed_weights_match_the_plain_pytorch_path(self, model, ckpt_dir, monkeypatch):
        # The default CPU model runs decode attention, the experts and the projections of small batches in the
        # native kernels (built with the system C compiler), and larger dense matmuls on oneDNN-packed weights.
        compiler = shutil.which("cc") or shutil.which("gcc")
        assert native.load_kernels().available == (compiler is not None), native.load_kernels().reason
        expected_native = prefill_and_decode(model)
        experts = [m for m in model.modules() if isinstance(m, MoEExperts)]
        # With the native kernels the experts are held once, in the kernel's panel layout; without them, packed
        # for oneDNN.
        available = native.load_kernels().available
        assert experts and all(
            (e.backend.panels is not None) == available and (e.backend.packed13 is None) == available for e in experts
        )
        assert all(e.w13.numel() == 0 and e.w2.numel() == 0 for e in experts)
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        assert any(m.backend.packed is not None for m in linears), "the CPU model was not packed"
        # Small decode batches (the four-sequence step below) run the projections in the native kernel on
        # panels, larger ones on the oneDNN copy; the plain weight stays only where something still reads it
        # (an output size the panels cannot hold, or the embedding a tied head shares).
        assert all((m.backend.panels is not None) == (available and m.out_features % 32 == 0) for m in linears)
        tied = model.lm_head.weight is model.embed_tokens.weight
        for m in linears:
            assert (m.weight.numel() > 0) == (m.backend.panels is None and available or (m is model.lm_head and tied)), m

        without_native_kernels(monkeypatch)
        # Without the native kernels the experts are packed for oneDNN instead, and hold no plain copy.
        packed = build_model(open_checkpoint(ckpt_dir))
        experts = [m for m in packed.modules() if isinstance(m, MoEExperts)]
        assert all(e.backend.packed13 is not None and e.w13.numel() == 0 and e.w2.numel() == 0 for e in experts)
        plain = build_model(open_checkpoint(ckpt_dir), pack_weights=False)
        assert all(m.backend.packed is None for m in plain.modules() if isinstance(m, Linear))
        reference = prefill_and_decode(plain)
        # The panels are a lossless layout: unpacked, they are the checkpoint's weights exactly (so the PyTorch
        # path on them is the plain model itself).
        assert (panels_checked_against_plain_weights(model, plain) > 0) == available
        for name, got in (("native kernels", expected_native), ("oneDNN-packed", prefill_and_decode(packed))):
            for part, a, b in zip(("prefill", "decode"), got, reference):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{name} {part} logits differ from plain PyTorch")

    def test_bfloat16_packed_weights_match_the_plain_ones(self, ckpt_dir):
        packed = build_model(open_checkpoint(ckpt_dir), dtype=torch.bfloat16)
        plain = build_model(open_checkpoint(ckpt_dir), dtype=torch.bfloat16, pack_weights=False)
        # oneDNN packs bfloat16 where the CPU supports it (AVX-512 and newer); elsewhere the plain weights stay.
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        assert any(isinstance(m, MoEExperts) and m.backend.packed13 is not None for m in packed.modules()) == supported
        ids = random_ids(PROMPT_LEN, seed=7)
        a, b = prefill(packed, new_cache(packed), ids), prefill(plain, new_cache(plain), ids)
        assert relative_error(a, b) < 3e-2, "bfloat16 packed logits stray from the plain bfloat16 ones"
        assert torch.equal(a.argmax(-1), b.argmax(-1))
