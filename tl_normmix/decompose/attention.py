"""Attention-block decomposition: pure tensor math (methods.md#attention-weights-and-norms).

Notation follows docs/methods.md: rows are receivers (query ``i``), columns are sources (key ``j``);
``v^h_j = x̂_j W_V^h + b_V^h`` is TransformerLens's ``hook_v`` (``b_V`` included) and the head's
write from source ``j`` is ``f^h(x_j) = v^h_j W_O^h``. Nothing here knows about TransformerLens:
the model adapter hands over plain tensors, already expanded to query heads under grouped-query
attention and cast to float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = [
    "SourceTerms",
    "attended_ends",
    "gram_factor",
    "head_mean",
    "head_summed_norms",
    "masked_pattern",
    "mixed_output",
    "per_head_norms",
    "psd_factor",
    "quadratic_norms",
    "self_part",
    "source_terms",
    "source_vectors",
    "value_norms",
]


def masked_pattern(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    mask: Bool[Tensor, "batch pos"],
) -> Float[Tensor, "batch head_index query_pos key_pos"]:
    """Zero the rows of padded queries and the columns of padded keys
    (methods.md#interventions-on-edges, padding)."""
    pair = mask[:, None, :, None] & mask[:, None, None, :]
    return pattern.masked_fill(~pair, 0.0)


def attended_ends(pattern: Float[Tensor, "batch head_index query_pos key_pos"]) -> list[int]:
    """Per receiver, one past the last key any head of any batch row attends to: every part of a
    later key is a zero vector (the future, in causal models), so chunked loops can stop there."""
    positions = torch.arange(pattern.shape[-1], device=pattern.device)
    attended = (pattern != 0).any(dim=1)  # [batch, query, key]
    return (torch.where(attended, positions, -1).amax(dim=(0, 2)) + 1).tolist()


def head_mean(
    per_head: Float[Tensor, "batch head_index query_pos key_pos"],
) -> Float[Tensor, "batch query_pos key_pos"]:
    """Layer map of ``attn_w``: the mean of ``α^h_ij`` over heads
    (methods.md#attention-weights-and-norms)."""
    return per_head.mean(dim=1)


def value_norms(
    v: Float[Tensor, "batch pos head_index d_head"],
    W_O: Float[Tensor, "head_index d_head d_model"],
) -> Float[Tensor, "batch head_index pos"]:
    """``‖f^h(x_j)‖ = ‖v^h_j W_O^h‖`` per head and source token
    (methods.md#attention-weights-and-norms, value norms).

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
    """``f^h(x_j) = v^h_j W_O^h`` for every source and head (methods.md#notation): ``N·H``
    vectors."""
    return torch.einsum("bjhd,hdm->bjhm", v, W_O)


def per_head_norms(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    f_norms: Float[Tensor, "batch head_index key_pos"],
) -> Float[Tensor, "batch head_index query_pos key_pos"]:
    """Per-head ``attn_n``: ``‖α^h_ij f^h(x_j)‖ = α^h_ij ‖f^h(x_j)‖``
    (methods.md#attention-weights-and-norms)."""
    return pattern * f_norms[:, :, None, :]


def gram_factor(
    f: Float[Tensor, "batch key_pos head_index d_model"],
) -> Float[Tensor, "batch key_pos head_index head_index"]:
    """A factor ``L_j`` of the per-source Gram matrix ``G_j[h, h'] = ⟨f^h_j, f^{h'}_j⟩ = L_j L_jᵀ``
    (methods.md#attention-weights-and-norms, cost)."""
    return psd_factor(torch.matmul(f, f.transpose(-1, -2)))


def psd_factor(gram: Float[Tensor, "*batch n n"]) -> Float[Tensor, "*batch n n"]:
    """``L`` with ``L Lᵀ = G`` for a positive semi-definite ``G``: Cholesky, or an eigen-factor
    where ``G`` is singular (e.g. a head whose ``W_O`` is zero)."""
    factor, info = torch.linalg.cholesky_ex(gram)
    bad = info != 0
    if bad.any():
        values, vectors = torch.linalg.eigh(gram[bad])
        factor[bad] = vectors * values.clamp_min(0.0).sqrt()[..., None, :]
    return factor


def quadratic_norms(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    factors: Sequence[Float[Tensor, "batch key_pos head_index rank"]],
    *,
    chunk_size: int | None = None,
) -> Float[Tensor, "factor batch query_pos key_pos"]:
    """``‖Σ_h α^h_ij f^h_j‖ = ‖L_jᵀ α_ij‖`` for each Gram factor ``L``
    (methods.md#attention-weights-and-norms, cost).

    Chunked over queries: each chunk of the pattern is transposed once so that every source ``j``
    holds its ``[query, head]`` block, and one batched matmul against all factors (concatenated)
    serves every factor at once. Cost ``O(N²·H·rank)`` per factor; working memory
    ``O(chunk·N·H·n_factors)``, never ``N²·d`` (``chunk_size`` None: every query at once).
    """
    batch, _, n_query, n_key = pattern.shape
    chunk_size = chunk_size or n_query
    ranks = [factor.shape[-1] for factor in factors]
    stacked = torch.cat(list(factors), dim=-1)  # [batch, key, head, Σ rank]
    out = pattern.new_empty(len(factors), batch, n_query, n_key)
    for start in range(0, n_query, chunk_size):
        stop = min(start + chunk_size, n_query)
        # [batch, head, key, chunk] contiguous, seen as [batch, key, chunk, head] without a copy.
        by_key = pattern[:, :, start:stop].transpose(-1, -2).contiguous().permute(0, 2, 3, 1)
        projected = torch.matmul(by_key, stacked)  # [batch, key, chunk, Σ rank]
        for index, part in enumerate(projected.split(ranks, dim=-1)):
            out[index, :, start:stop] = torch.linalg.vector_norm(part, dim=-1).transpose(1, 2)
    return out


def head_summed_norms(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    f: Float[Tensor, "batch key_pos head_index d_model"],
    *,
    chunk_size: int | None = None,
) -> Float[Tensor, "batch query_pos key_pos"]:
    """``‖Σ_h α^h_ij f^h_j‖`` for all pairs without an ``N×N×d`` tensor
    (methods.md#attention-weights-and-norms)."""
    return quadratic_norms(pattern, [gram_factor(f)], chunk_size=chunk_size)[0]


@dataclass
class SourceTerms:
    """Per-source quantities of one layer, from one chunked pass over the sources."""

    factors: list[Float[Tensor, "batch key_pos head_index head_index"]]  # one per transform
    own: Float[Tensor, "batch pos d_model"]  # Σ_h α^h_ii f^h_i
    value_norms: Float[Tensor, "batch head_index pos"]  # ‖f^h_j‖


def source_terms(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    v: Float[Tensor, "batch pos head_index d_head"],
    W_O: Float[Tensor, "head_index d_head d_model"],
    transforms: Sequence[Callable[[Tensor], Tensor] | None],
    *,
    chunk_size: int | None = None,
) -> SourceTerms:
    """Gram factors of ``T f^h_j`` for each fixed linear map ``T`` (None: the identity), the self
    part and the value norms (methods.md#attention-weights-and-norms), building ``f`` only
    ``chunk_size`` sources at a time (None: every source at once)."""
    batch, pos, heads, _ = v.shape
    chunk_size = chunk_size or pos
    diagonal = pattern.diagonal(dim1=-2, dim2=-1)  # [batch, head, pos]
    factors = [v.new_empty(batch, pos, heads, heads) for _ in transforms]
    own = v.new_empty(batch, pos, W_O.shape[-1])
    norms = v.new_empty(batch, pos, heads)
    for start in range(0, pos, chunk_size):
        stop = min(start + chunk_size, pos)
        f = source_vectors(v[:, start:stop], W_O)
        own[:, start:stop] = self_part(diagonal[..., start:stop], f)
        have_norms = False
        for factor, transform in zip(factors, transforms, strict=True):
            g = f if transform is None else transform(f)
            gram = torch.matmul(g, g.transpose(-1, -2))
            if transform is None and not have_norms:  # ‖f^h_j‖² is the Gram diagonal
                norms[:, start:stop] = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0.0).sqrt()
                have_norms = True
            factor[:, start:stop] = psd_factor(gram)
        if not have_norms:
            norms[:, start:stop] = f.norm(dim=-1)
    return SourceTerms(factors=factors, own=own, value_norms=norms.transpose(1, 2))


def mixed_output(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    v: Float[Tensor, "batch pos head_index d_head"],
    W_O: Float[Tensor, "head_index d_head d_model"],
) -> Float[Tensor, "batch query_pos d_model"]:
    """``Σ_j Σ_h α^h_ij f^h(x_j)``, the attention output without ``b_O``
    (methods.md#attention-weights-and-norms)."""
    z = torch.einsum("bhij,bjhd->bihd", pattern, v)
    return torch.einsum("bihd,hdm->bim", z, W_O)


def self_part(
    diagonal: Float[Tensor, "batch head_index pos"],
    f: Float[Tensor, "batch pos head_index d_model"],
) -> Float[Tensor, "batch pos d_model"]:
    """``Σ_h α^h_ii f^h(x_i)`` from the pattern's diagonal: what token ``i`` takes from itself."""
    return (f * diagonal.transpose(1, 2)[..., None]).sum(dim=2)
