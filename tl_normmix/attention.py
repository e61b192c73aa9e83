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


def source_vectors(
    v: Float[Tensor, "batch pos head_index d_head"],
    W_O: Float[Tensor, "head_index d_head d_model"],
) -> Float[Tensor, "batch pos head_index d_model"]:
    """``f^h(x_j) = v^h_j W_O^h`` for every source and head (METHODS §0): ``N·H`` vectors."""
    return torch.einsum("bjhd,hdm->bjhm", v, W_O)


def per_head_norms(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    f_norms: Float[Tensor, "batch head_index key_pos"],
) -> Float[Tensor, "batch head_index query_pos key_pos"]:
    """Per-head ``attn_n``: ``‖α^h_ij f^h(x_j)‖ = α^h_ij ‖f^h(x_j)‖`` (METHODS §1)."""
    return pattern * f_norms[:, :, None, :]


def head_summed_norms(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    f: Float[Tensor, "batch key_pos head_index d_model"],
    *,
    chunk_size: int = 256,
) -> Float[Tensor, "batch query_pos key_pos"]:
    """``‖Σ_h α^h_ij f^h_j‖`` as a quadratic form over the per-source Gram matrix (METHODS §1).

    ``G_j[h, h'] = ⟨f^h_j, f^{h'}_j⟩`` costs ``O(N·H²·d)``; the form ``Σ α^h α^{h'} G`` costs
    ``O(N²·H²)``, evaluated ``chunk_size`` queries at a time so peak memory is
    ``O(chunk·N·H)``, never ``N²·d``.
    """
    gram = torch.einsum("bjhm,bjgm->bjhg", f, f)
    batch, _, n_query, n_key = pattern.shape
    out = pattern.new_empty(batch, n_query, n_key)
    for start in range(0, n_query, chunk_size):
        alpha = pattern[:, :, start : start + chunk_size]
        weighted = torch.einsum("bhqk,bkhg->bqkg", alpha, gram)
        out[:, start : start + chunk_size] = (weighted * alpha.permute(0, 2, 3, 1)).sum(-1)
    return out.clamp_min(0.0).sqrt()


def mixed_output(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    v: Float[Tensor, "batch pos head_index d_head"],
    W_O: Float[Tensor, "head_index d_head d_model"],
) -> Float[Tensor, "batch query_pos d_model"]:
    """``Σ_j Σ_h α^h_ij f^h(x_j)``, the attention output without ``b_O`` (METHODS §1)."""
    z = torch.einsum("bhij,bjhd->bihd", pattern, v)
    return torch.einsum("bihd,hdm->bim", z, W_O)


def self_part(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    f: Float[Tensor, "batch pos head_index d_model"],
) -> Float[Tensor, "batch pos d_model"]:
    """``Σ_h α^h_ii f^h(x_i)``: what token ``i`` takes from itself through attention."""
    diagonal = pattern.diagonal(dim1=-2, dim2=-1)  # [batch, head, pos]
    return torch.einsum("bhi,bihm->bim", diagonal, f)
