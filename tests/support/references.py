"""Plain-PyTorch references the kernel and ops tests compare against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_experts(x, topk_ids, topk_weights, w13, w2, expert_ids=None) -> torch.Tensor:
    """Each wanted expert's SwiGLU on the tokens that chose it, weighted and summed per token: x [T, H] -> [T, H]."""
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        token, choice = (topk_ids == e).nonzero(as_tuple=True)
        if token.numel() and (expert_ids is None or e in expert_ids):
            gate, up = F.linear(x[token], w13[e]).chunk(2, dim=-1)
            out.index_add_(0, token, F.linear(F.silu(gate) * up, w2[e]) * topk_weights[token, choice][:, None])
    return out
