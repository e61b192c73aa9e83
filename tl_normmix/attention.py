"""Attention-block decomposition: pure tensor math (METHODS.md §1).

Notation follows METHODS.md: rows are receivers (query ``i``), columns are sources (key ``j``);
``v^h_j = x̂_j W_V^h + b_V^h`` is TransformerLens's ``hook_v`` (``b_V`` included) and the head's
write from source ``j`` is ``f^h(x_j) = v^h_j W_O^h``. Nothing here knows about TransformerLens:
the model adapter hands over plain tensors, already expanded to query heads under grouped-query
attention and cast to float32.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["head_mean", "masked_pattern", "value_norms"]


def masked_pattern(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    mask: Bool[Tensor, "batch pos"],
) -> Float[Tensor, "batch head_index query_pos key_pos"]:
    """Zero the rows of padded queries and the columns of padded keys (METHODS §5, padding)."""
    pair = mask[:, None, :, None] & mask[:, None, None, :]
    return pattern.masked_fill(~pair, 0.0)


def head_mean(
    per_head: Float[Tensor, "batch head_index query_pos key_pos"],
) -> Float[Tensor, "batch query_pos key_pos"]:
    """Layer map of ``attn_w``: the mean of ``α^h_ij`` over heads (METHODS §1)."""
    return per_head.mean(dim=1)


def value_norms(
    v: Float[Tensor, "batch pos head_index d_head"],
    W_O: Float[Tensor, "head_index d_head d_model"],
) -> Float[Tensor, "batch head_index pos"]:
    """``‖f^h(x_j)‖ = ‖v^h_j W_O^h‖`` per head and source token (METHODS §1, value norms).

    Evaluated as the quadratic form ``v (W_O W_Oᵀ) vᵀ`` so no ``[batch, pos, head, d_model]``
    tensor is built: cost ``O(H·d_h²·(d + N))`` instead of ``O(N·H·d_h·d)``.
    """
    gram = torch.einsum("hdm,hem->hde", W_O, W_O)  # [head, d_head, d_head]
    squared = torch.einsum("bphd,hde,bphe->bhp", v, gram, v)
    return squared.clamp_min(0.0).sqrt()
