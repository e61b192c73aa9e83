"""Integrated gradients through *any* feed-forward block (methods.md#the-feed-forward-block, generic
path).

For a feed-forward block with no closed form here — a mixture of experts (router, top-k experts,
shared expert), an activation that mixes hidden units — the model's own module ``F`` is integrated
along the straight path from the bias point ``u^b_i`` to the input ``u_i = u^b_i + Σ_j u_ij``:

    IG_ij = ∫₀¹ J_F(u^b_i + t Σ_k u_ik) u_ij dt ≈ Σ_q w_q J_F(u^b_i + t_q Σ_k u_ik) u_ij

with ``Q``-point Gauss–Legendre nodes ``t_q`` and weights ``w_q`` on ``[0, 1]``. Each
Jacobian-vector product is one forward-mode derivative (``torch.func.jvp``) of ``F`` at the
receiver's path point along the pair's own part, so the cost is ``Q`` forward-mode passes of ``F``
over ``N²`` token vectors per layer (chunked over receivers); no Jacobian is formed.

Completeness ``Σ_j IG_ij = F(u_i) − F(u^b_i)`` holds to quadrature accuracy where ``F`` is smooth
along the path. A router whose top-k choice changes along the path makes ``F`` jump there; the
quadrature then misses the jump and the completeness residual (reported with every map) shows it.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from tl_normmix.decompose.blocks import FFModule
from tl_normmix.decompose.feedforward import gauss_legendre

__all__ = ["DEFAULT_POINTS", "integrated_gradients", "jvp_cost"]

#: Gauss–Legendre points of the generic path (the same default as the gated closed form).
DEFAULT_POINTS = 32


def integrated_gradients(
    ff: FFModule,
    parts: Float[Tensor, "batch key chunk d_model"],
    total: Float[Tensor, "batch chunk d_model"],
    base: Float[Tensor, "batch chunk d_model"],
    points: int = DEFAULT_POINTS,
) -> Float[Tensor, "batch key chunk d_model"]:
    """``IG_ij`` for receivers ``i`` of a chunk (``parts[:, j, i]`` is ``u_ij``, ``total[:, i]``
    is ``Σ_j u_ij``, ``base[:, i]`` the bias point ``u^b_i``), by ``points``-point Gauss–Legendre
    quadrature of forward-mode derivatives of ``ff``."""
    nodes, weights = gauss_legendre(points, parts)
    d = parts.shape[-1]
    tangents = parts.reshape(-1, d).contiguous()
    out = torch.zeros_like(parts)
    with ff.forward_ad():
        for t, w in zip(nodes.tolist(), weights.tolist(), strict=True):
            point = (base + t * total)[:, None].expand_as(parts).reshape(-1, d).contiguous()
            derivative = torch.func.jvp(ff.forward, (point,), (tangents,))[1]
            out.add_(derivative.view_as(parts), alpha=w)
    return out


def jvp_cost(pairs: int, points: int = DEFAULT_POINTS) -> int:
    """Forward-mode passes of the feed-forward module over single token vectors."""
    return pairs * points
