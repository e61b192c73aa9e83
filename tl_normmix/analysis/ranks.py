"""Ranks and the cells they compare: Spearman's ρ with ties averaged, and the valid cells of a
map (pairs of real tokens; for causal models only ``j ≤ i``, whose future cells are zero in every
map and would inflate ρ)."""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["spearman", "valid_cells"]


def valid_cells(
    mask: Bool[Tensor, "batch pos"], causal: bool
) -> Bool[Tensor, "batch query_pos key_pos"]:
    """Pairs of real tokens of a run with padding ``mask``; for causal models only ``j ≤ i``."""
    pair = mask[:, :, None] & mask[:, None, :]
    if causal:
        n = mask.shape[-1]
        pair = pair & torch.ones(n, n, dtype=torch.bool, device=pair.device).tril()
    return pair


def _ranks(x: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    values, order = x.sort()
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1.0) / 2.0  # 1-based mean rank of each tie group
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = average[inverse]
    return ranks


def spearman(a: Float[Tensor, " n"], b: Float[Tensor, " n"]) -> float:
    """Spearman's ``ρ`` of two vectors (NaN if either is constant or ``n < 2``)."""
    if a.numel() < 2:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denominator) if denominator > 0 else float("nan")
