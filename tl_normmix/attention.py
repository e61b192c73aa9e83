"""Attention-block decomposition: pure tensor math (METHODS.md §1).

Notation follows METHODS.md: rows are receivers (query ``i``), columns are sources (key ``j``);
``v^h_j = x̂_j W_V^h + b_V^h`` is TransformerLens's ``hook_v`` (``b_V`` included) and the head's
write from source ``j`` is ``f^h(x_j) = v^h_j W_O^h``. Nothing here knows about TransformerLens:
the model adapter hands over plain tensors, already expanded to query heads under grouped-query
attention and cast to float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = [
    "by_key",
    "gram_factor",
    "head_mean",
    "head_summed_norms",
    "masked_pattern",
    "mixed_output",
    "per_head_norms",
    "quadratic_norms",
    "self_part",
    "source_vectors",
    "value_norms",
]


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


def gram_factor(
    f: Float[Tensor, "batch key_pos head_index d_model"],
) -> Float[Tensor, "batch key_pos head_index head_index"]:
    """A factor ``L_j`` of the per-source Gram matrix ``G_j[h, h'] = ⟨f^h_j, f^{h'}_j⟩ = L_j L_jᵀ``
    (METHODS §1, cost): Cholesky, or an eigen-factor where ``G_j`` is singular (a zero head)."""
    gram = torch.einsum("bjhm,bjgm->bjhg", f, f)
    factor, info = torch.linalg.cholesky_ex(gram)
    bad = info != 0
    if bad.any():
        values, vectors = torch.linalg.eigh(gram[bad])
        factor[bad] = vectors * values.clamp_min(0.0).sqrt()[..., None, :]
    return factor


def by_key(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
) -> Float[Tensor, "batch key_pos query_pos head_index"]:
    """The pattern laid out per source, contiguous: ``α_j`` as a ``[query, head]`` matrix."""
    return pattern.permute(0, 3, 2, 1).contiguous()


def quadratic_norms(
    alpha_by_key: Float[Tensor, "batch key_pos query_pos head_index"],
    factors: Sequence[Float[Tensor, "batch key_pos head_index head_index"]],
    *,
    chunk_size: int = 512,
) -> list[Float[Tensor, "batch query_pos key_pos"]]:
    """``‖Σ_h α^h_ij f^h_j‖ = ‖L_jᵀ α_ij‖`` for each Gram factor (METHODS §1, cost).

    One batched matmul per chunk of sources serves every factor at once (they are concatenated),
    so cost is ``O(N²·H²)`` per factor and peak memory ``O(chunk·N·H)``, never ``N²·d``.
    """
    batch, n_key, n_query, heads = alpha_by_key.shape
    stacked = torch.cat(list(factors), dim=-1)  # [batch, key, head, head · n_factors]
    out = alpha_by_key.new_empty(len(factors), batch, n_key, n_query)
    for start in range(0, n_key, chunk_size):
        stop = start + chunk_size
        projected = torch.matmul(alpha_by_key[:, start:stop], stacked[:, start:stop])
        squares = projected.square().unflatten(-1, (len(factors), heads)).sum(-1)
        out[:, :, start:stop] = squares.permute(3, 0, 1, 2)
    return list(out.sqrt().transpose(-1, -2))


def head_summed_norms(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    f: Float[Tensor, "batch key_pos head_index d_model"],
    *,
    chunk_size: int = 512,
) -> Float[Tensor, "batch query_pos key_pos"]:
    """``‖Σ_h α^h_ij f^h_j‖`` for all pairs without an ``N×N×d`` tensor (METHODS §1)."""
    return quadratic_norms(by_key(pattern), [gram_factor(f)], chunk_size=chunk_size)[0]


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
