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
along the path. A mixture of experts whose top-k choice changes along the path jumps there: given
its ``Router``, the path is cut at the switch points (``router_path``), each smooth segment gets its
own quadrature, and each jump is measured and shared among the sources by their part of the score
gap that causes it. Without one, the quadrature misses the jumps and the completeness residual
(reported with every map) shows them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from tl_normmix.decompose import router_path
from tl_normmix.decompose.blocks import FFModule, Router
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
    quadrature of forward-mode derivatives of ``ff`` — per smooth segment and with its jumps,
    where ``ff`` has a ``Router``."""
    nodes, weights = gauss_legendre(points, parts)
    d = parts.shape[-1]
    out = torch.zeros_like(parts)
    router = ff.router
    switches = None
    if router is not None:
        switches = router_path.find_switches(router, base.reshape(-1, d), total.reshape(-1, d))
    with ff.forward_ad():
        if switches is None or not switches.any:
            tangents = parts.reshape(-1, d).contiguous()
            for t, w in zip(nodes.tolist(), weights.tolist(), strict=True):
                point = (base + t * total)[:, None].expand_as(parts).reshape(-1, d).contiguous()
                derivative = torch.func.jvp(ff.forward, (point,), (tangents,))[1]
                out.add_(derivative.view_as(parts), alpha=w)
            return out
        assert router is not None
        _by_segment(ff.forward, switches, parts, total, base, len(nodes), out)
        _add_jumps(ff.forward, router, switches, parts, total, base, out)
    return out


def _by_segment(
    forward: Callable[[Tensor], Tensor],
    switches: router_path.Switches,
    parts: Tensor,
    total: Tensor,
    base: Tensor,
    points: int,
    out: Tensor,
) -> None:
    """Gauss–Legendre on every receiver's pieces between its switches; each node is evaluated
    only for the receivers that have a piece there (the later pieces belong to few)."""
    batch, keys, chunk, d = parts.shape
    at, w_at = router_path.segment_nodes(switches, points)
    by_receiver = parts.permute(0, 2, 1, 3).reshape(batch * chunk, keys, d)
    base_r, total_r = base.reshape(-1, d), total.reshape(-1, d)
    summed = torch.zeros_like(by_receiver)
    for k in range(at.shape[1]):
        rows = (w_at[:, k] != 0).nonzero().flatten()
        if rows.numel() == 0:
            continue
        t_k = at[rows, k].to(parts.dtype)[:, None]
        point = (base_r[rows] + t_k * total_r[rows])[:, None].expand(-1, keys, d)
        tangents = by_receiver[rows].reshape(-1, d)
        point = point.reshape(-1, d).contiguous()
        derivative = torch.func.jvp(forward, (point,), (tangents,))[1]
        w_k = w_at[rows, k].to(parts.dtype)[:, None, None]
        summed.index_add_(0, rows, derivative.view(-1, keys, d) * w_k)
    out.add_(summed.view(batch, chunk, keys, d).permute(0, 2, 1, 3))


def _add_jumps(
    forward: Callable[[Tensor], Tensor],
    router: Router,
    switches: router_path.Switches,
    parts: Tensor,
    total: Tensor,
    base: Tensor,
    out: Tensor,
) -> None:
    """Each switch's jump ``ΔF = F(τ⁺) − F(τ⁻)``, measured at ``τ ± δ`` with the first-order
    drift of the smooth pieces removed, shared among the sources by ``∇d·u_j / ∇d·U``."""
    batch, keys, chunk, d = parts.shape
    rows, slots = switches.valid.nonzero(as_tuple=True)
    tau = switches.at[rows, slots]
    delta = router_path.jump_width(switches, torch.finfo(parts.dtype).eps)[rows, slots]
    u_b, path = base.reshape(-1, d)[rows].double(), total.reshape(-1, d)[rows].double()

    def at(t: Tensor) -> Tensor:
        return (u_b + t[:, None] * path).to(parts.dtype)

    after, before = at(tau + delta), at(tau - delta)
    direction = path.to(parts.dtype)
    slope_after = torch.func.jvp(forward, (after,), (direction,))[1]
    slope_before = torch.func.jvp(forward, (before,), (direction,))[1]
    jump = forward(after) - forward(before)
    jump = jump - delta[:, None].to(jump) * (slope_after + slope_before)
    gradient = router.gap_gradient(
        at(tau), switches.entering[rows, slots], switches.leaving[rows, slots]
    )
    by_receiver = parts.permute(0, 2, 1, 3).reshape(batch * chunk, keys, d)
    share = torch.einsum("skd,sd->sk", by_receiver[rows], gradient.to(parts.dtype))
    share = share / (direction * gradient.to(parts.dtype)).sum(-1, keepdim=True)
    added = torch.zeros_like(by_receiver).index_add_(0, rows, share[..., None] * jump[:, None])
    out.add_(added.view(batch, chunk, keys, d).permute(0, 2, 1, 3))


def jvp_cost(pairs: int, points: int = DEFAULT_POINTS) -> int:
    """Forward-mode passes of the feed-forward module over single token vectors."""
    return pairs * points
