"""The native CPU kernels against the PyTorch paths they replace, side by side in one run (float32).

  1. decode attention over a paged KV cache, 8 layers: the native kernel
     reading blocks in place vs gathering them (index_select) + SDPA;
  2. one MoE layer's experts (--tokens rows, top-2 of 8; 32 is a decode step,
     2048 a prefill chunk), 8 layers of distinct weights: the native kernel on
     its panel layout (what the models use) vs the same kernel on the
     checkpoint layout vs oneDNN-packed weights vs `F.linear` on the plain
     weights;
  3. the dense projections of a decode step of --rows sequences (8 layers of
     q/k/v and o, and the head): the native kernel on panels (what the models
     use) vs on the plain layout vs oneDNN-packed weights vs `F.linear`;
  4. the small operations of a decode step of 32 sequences, 8 layers: two
     RMSNorms (one after the residual add), rotary embedding of q and k with
     the KV cache write, and the router's softmax and top-k; the native calls
     vs the PyTorch operators they replace.

Shapes follow the ~100M bench checkpoint (hidden 512, 8 heads / 4 kv heads
of 64, 8 experts of 1024, vocab 4096). Each contender keeps its best of --repeats.

    python -m bench.native_bench [--context 165] [--tokens 32] [--rows 8] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from moemesh.worker.models.layers import RotaryEmbedding
from moemesh.worker.ops import native
from moemesh.worker.ops.attention import apply_rotary

LAYERS, SEQS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 8, 32, 8, 4, 64, 16
EXPERTS, HIDDEN, INTER, TOP_K, VOCAB = 8, 512, 1024, 2, 4096


def best_ms(fn, repeats: int) -> float:
    return best_ms_alternating([fn], repeats)[0]


def best_ms_alternating(fns, repeats: int) -> list[float]:
    """Each function's best time of `repeats`, the functions taking turns (a noisy spell hits all alike)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return [b * 1e3 for b in best]


def attention(context: int, repeats: int) -> None:
    per_seq = -(-context // BLOCK)
    shape = (SEQS * per_seq, BLOCK, KV_HEADS, HEAD_DIM)
    caches = [(torch.randn(shape), torch.randn(shape)) for _ in range(LAYERS)]
    tables = torch.randperm(SEQS * per_seq).view(SEQS, per_seq)  # scattered blocks
    lens = torch.full((SEQS,), context)
    q = torch.randn(SEQS, HEADS, HEAD_DIM)

    def in_place():
        for k, v in caches:
            native.paged_decode_attention(q, k, v, tables, lens, None)

    def gathered():
        for k, v in caches:
            keys = k.index_select(0, tables.flatten()).view(SEQS, -1, KV_HEADS, HEAD_DIM)[:, :context]
            values = v.index_select(0, tables.flatten()).view(SEQS, -1, KV_HEADS, HEAD_DIM)[:, :context]
            F.scaled_dot_product_attention(q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2), enable_gqa=True)

    a, b = best_ms(in_place, repeats), best_ms(gathered, repeats)
    print(f"decode attention, {LAYERS} layers x {SEQS} seqs x {context} keys: native {a:.2f} ms, "
          f"gather + SDPA {b:.2f} ms, ratio {b / a:.2f}x")


def experts(tokens: int, repeats: int) -> None:
    w13 = [torch.randn(EXPERTS, 2 * INTER, HIDDEN) for _ in range(LAYERS)]
    w2 = [torch.randn(EXPERTS, HIDDEN, INTER) for _ in range(LAYERS)]
    packed = [([torch.ops.mkldnn._reorder_linear_weight(w) for w in a], [torch.ops.mkldnn._reorder_linear_weight(w) for w in b])
              for a, b in zip(w13, w2)]
    panels = [native.pack_experts(a, b) for a, b in zip(w13, w2)]
    x = torch.randn(tokens, HIDDEN)
    ids, weights = torch.stack([torch.randperm(EXPERTS)[:TOP_K] for _ in range(tokens)]), torch.rand(tokens, TOP_K)
    # The library contenders get the grouping by expert for free (done once, here); the native call
    # groups the router's choices itself, every call.
    order = ids.flatten().argsort(stable=True)
    token_of, weight_of = order // TOP_K, weights.flatten()[order]
    counts = torch.bincount(ids.flatten(), minlength=EXPERTS).tolist()

    def fused(layers):
        def run():
            for a, b in layers:
                native.moe_experts(x, ids, weights, a, b)
        return run

    def looped(linear13, linear2):
        def run():
            for layer in range(LAYERS):
                rows, outputs, start = x[token_of], [], 0
                for e, count in enumerate(counts):
                    gate, up = linear13(layer, e, rows[start : start + count]).chunk(2, dim=-1)
                    outputs.append(linear2(layer, e, F.silu(gate) * up))
                    start += count
                torch.zeros_like(x).index_add_(0, token_of, torch.cat(outputs) * weight_of[:, None])
        return run

    def onednn(index):
        return lambda layer, e, rows: torch.ops.mkldnn._linear_pointwise(rows, packed[layer][index][e], None, "none", [], "")

    def plain(weights):
        return lambda layer, e, rows: F.linear(rows, weights[layer][e])

    a, d = best_ms_alternating([fused(panels), fused(list(zip(w13, w2)))], repeats)
    b = best_ms(looped(onednn(0), onednn(1)), repeats)
    c = best_ms(looped(plain(w13), plain(w2)), repeats)
    gbs = LAYERS * EXPERTS * 3 * HIDDEN * INTER * 4 / a / 1e6
    print(f"experts, {LAYERS} layers, {tokens} tokens top-{TOP_K} of {EXPERTS}: native on panels {a:.2f} ms "
          f"({gbs:.0f} GB/s of weights), native on the checkpoint layout {d:.2f} ms ({d / a:.2f}x), "
          f"oneDNN packed {b:.2f} ms ({b / a:.2f}x), F.linear {c:.2f} ms ({c / a:.2f}x)")


def projections(rows: int, repeats: int) -> None:
    shapes = [((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), (HIDDEN, HEADS * HEAD_DIM)] * LAYERS + [(VOCAB, HIDDEN)]
    weights = [torch.randn(shape) / shape[1] ** 0.5 for shape in shapes]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    panels = [native.pack_linear(w) for w in weights]
    x = torch.randn(rows, HIDDEN)
    a, d, b = best_ms_alternating([
        lambda: [native.linear(x, p) for p in panels],
        lambda: [native.linear(x, w) for w in weights],
        lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed],
    ], repeats)
    c = best_ms(lambda: [F.linear(x, w) for w in weights], repeats)
    print(f"dense projections, {LAYERS} layers + head, {rows} rows: native on panels {a:.2f} ms, native on the plain "
          f"layout {d:.2f} ms ({d / a:.2f}x), oneDNN packed {b:.2f} ms ({b / a:.2f}x), F.linear {c:.2f} ms ({c / a:.2f}x)")


def layer_ops(repeats: int) -> None:
    eps, weight = 1e-5, torch.rand(HIDDEN) + 0.5
    router = torch.randn(EXPERTS, HIDDEN) / HIDDEN**0.5
    h, attended = torch.randn(SEQS, HIDDEN), torch.randn(SEQS, HIDDEN)
    qkv = torch.randn(SEQS, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
    q, k, v = (t.view(SEQS, -1, HEAD_DIM) for t in qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1))
    cos, sin = RotaryEmbedding(HEAD_DIM, 1e6)(torch.arange(SEQS) + 160)
    cache_k, cache_v = torch.zeros(SEQS * 12, BLOCK, KV_HEADS, HEAD_DIM), torch.zeros(SEQS * 12, BLOCK, KV_HEADS, HEAD_DIM)
    slots = torch.arange(SEQS) * 12 * BLOCK + 160

    def fused():
        for _ in range(LAYERS):
            native.rms_norm(h, weight, eps)
            native.rotary_store(q, k, v, cos, sin, slots, cache_k, cache_v)
            x, _ = native.rms_norm(attended, weight, eps, h)
            native.route(x, router, TOP_K, True)

    def norm(x):
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def operators():  # the PyTorch backends (worker/ops), operator for operator
        for _ in range(LAYERS):
            norm(h)
            apply_rotary(q, cos, sin)
            cache_k.view(-1, KV_HEADS, HEAD_DIM).index_copy_(0, slots, apply_rotary(k, cos, sin))
            cache_v.view(-1, KV_HEADS, HEAD_DIM).index_copy_(0, slots, v)
            summed = h + attended
            probs = F.linear(norm(summed), router).float().softmax(dim=-1)
            top, _ = probs.topk(TOP_K, dim=-1)
            top / top.sum(dim=-1, keepdim=True)

    a, b = best_ms(fused, repeats), best_ms(operators, repeats)
    print(f"layer ops (norms, rotary + cache write, router), {LAYERS} layers x {SEQS} seqs: native {a:.2f} ms, "
          f"PyTorch operators {b:.2f} ms ({b / a:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=165, help="keys per sequence (mid-run of the engine benchmark)")
    parser.add_argument("--tokens", type=int, default=SEQS, help="token rows of the expert layer (32: a decode step)")
    parser.add_argument("--rows", type=int, default=8, help="token rows of the dense projections")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    kernels = native.load_kernels()
    if not kernels.available:
        raise SystemExit(f"native kernels unavailable: {kernels.reason}")
    print(f"{torch.get_num_threads()} threads")
    attention(args.context, args.repeats)
    experts(args.tokens, args.repeats)
    projections(args.rows, args.repeats)
    layer_ops(args.repeats)


if __name__ == "__main__":
    main()
