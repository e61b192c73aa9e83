"""Where a mixture of experts changes its choice along the integration path, and what the jump
there is worth to each source (methods.md#the-feed-forward-block, mixtures of experts).

Along the path ``u(t) = u^b + t·U`` (``U = Σ_j u_j``) the router's logits are affine in ``t``,
``r(t) = r(0) + t·U W``, so its choice is constant between finitely many switch points. Candidates
are a grid of the path and — where the choice ranks the logits themselves — every crossing of two
experts' scores in closed form, ``t_ab = (s_b(0) − s_a(0)) / (U·(w_a − w_b))``; the choice is
evaluated at each candidate, and each interval where it changes is bisected to the switch point
(snapped to the exact crossing of the entering and the leaving expert where there is one).

Between switches the block is smooth: integrated gradients are Gauss–Legendre quadrature per
segment. At a switch ``τ`` the block jumps by ``ΔF``; as the limit of integrated gradients of a
smoothed step of the score gap ``d = s_a − s_b`` (entering ``a``, leaving ``b``), source ``j``
receives the share ``∇d·u_j / ∇d·U`` of the jump (``∇d = w_a − w_b`` where scores are logits).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_normmix.decompose.blocks import Router
from tl_normmix.decompose.feedforward import gauss_legendre

__all__ = ["Switches", "find_switches", "jump_width", "segment_nodes"]

#: Points of the grid of candidates (closed-form crossings come on top where they exist).
GRID = 64
#: Bisection steps: the switch point to float64 resolution.
STEPS = 52
#: Fewest Gauss–Legendre points on a piece of the path between two switches.
MIN_SEGMENT_POINTS = 8
#: Switches closer to the bias point than this are ties there, not switches along the path.
TIED = 1e-12
#: Closed-form crossings are computed for up to this many experts (their number grows as E²).
CLOSED_FORM_EXPERTS = 64


@dataclass(frozen=True)
class Switches:
    """Per receiver, the switch points ``at`` (sorted; ``1`` where ``valid`` is False) and the
    expert entering and leaving the choice there."""

    at: Float[Tensor, "receiver slot"]
    valid: Bool[Tensor, "receiver slot"]
    entering: Int[Tensor, "receiver slot"]
    leaving: Int[Tensor, "receiver slot"]

    @property
    def any(self) -> bool:
        return bool(self.valid.any())


def _crossings(router: Router, r0: Tensor, r1: Tensor) -> Tensor | None:
    """Every pair's score crossing in ``(0, 1)`` where scores are the logits (``[R, pairs]``,
    0 where there is none), else None."""
    if router.score != "logits" or router.groups > 1 or router.n_experts > CLOSED_FORM_EXPERTS:
        return None
    s0 = router.scores(r0)
    a, b = torch.triu_indices(router.n_experts, router.n_experts, offset=1, device=r0.device)
    slope = r1[:, a] - r1[:, b]
    t = (s0[:, b] - s0[:, a]) / slope
    inside = (slope != 0) & (t > 0) & (t < 1)
    return torch.where(inside, t, torch.zeros_like(t))


def find_switches(
    router: Router,
    base: Float[Tensor, "receiver d_model"],
    total: Float[Tensor, "receiver d_model"],
) -> Switches:
    """The points of ``[0, 1]`` where the choice of ``router`` along ``base + t·total`` changes
    (computed in float64)."""
    router = router.to(torch.float64)
    r0 = router.logits(base.double())
    r1 = total.double() @ router.weight
    receivers = r0.shape[0]
    grid = torch.linspace(0, 1, GRID + 1, dtype=r0.dtype, device=r0.device)
    candidates = grid.expand(receivers, -1)
    crossings = _crossings(router, r0, r1)
    if crossings is not None:
        candidates = torch.cat([candidates, crossings], dim=1)
    candidates = candidates.sort(dim=1).values
    chosen = router.chosen_by(r0[:, None] + candidates[..., None] * r1[:, None])
    change = (chosen[:, 1:] != chosen[:, :-1]).any(-1)  # [R, C − 1]
    rows, slot = change.nonzero(as_tuple=True)
    lo, hi = candidates[rows, slot], candidates[rows, slot + 1]
    before = chosen[rows, slot]
    r0_, r1_ = r0[rows], r1[rows]
    for _ in range(STEPS):
        mid = (lo + hi) / 2
        same = (router.chosen_by(r0_ + mid[:, None] * r1_) == before).all(-1)
        lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
    after = router.chosen_by(r0_ + hi[:, None] * r1_)
    entering = (after & ~before).double().argmax(-1)
    leaving = (before & ~after).double().argmax(-1)
    at = (lo + hi) / 2
    if crossings is not None:  # the exact crossing of the two experts that swap
        s0 = router.scores(r0_)
        slope = r1_.gather(1, entering[:, None]) - r1_.gather(1, leaving[:, None])
        exact = (s0.gather(1, leaving[:, None]) - s0.gather(1, entering[:, None])) / slope
        exact = exact.squeeze(1)
        at = torch.where((exact >= lo - 1e-9) & (exact <= hi + 1e-9), exact, at)
    # Experts tied at the bias point itself (a router without biases at u^b = 0) change nothing
    # along the path: only F(u^b) sees that choice.
    along = at > TIED
    return _pack(receivers, rows[along], at[along], entering[along], leaving[along])


def _pack(receivers: int, rows: Tensor, at: Tensor, entering: Tensor, leaving: Tensor) -> Switches:
    """Per-receiver rows of the switches (found sorted by receiver, then by ``t``)."""
    counts = torch.bincount(rows, minlength=receivers)
    slots = int(counts.max()) if rows.numel() else 0
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=rows.device) - first[rows]
    shape = (receivers, slots)
    out_at = torch.ones(shape, dtype=at.dtype, device=at.device)
    valid = torch.zeros(shape, dtype=torch.bool, device=at.device)
    out_in = torch.zeros(shape, dtype=torch.long, device=at.device)
    out_out = torch.zeros(shape, dtype=torch.long, device=at.device)
    out_at[rows, slot], valid[rows, slot] = at, True
    out_in[rows, slot], out_out[rows, slot] = entering, leaving
    return Switches(out_at, valid, out_in, out_out)


def segment_nodes(
    switches: Switches, points: int, minimum: int = MIN_SEGMENT_POINTS
) -> tuple[Float[Tensor, "receiver k"], Float[Tensor, "receiver k"]]:
    """Gauss–Legendre nodes and weights on every receiver's pieces between its switches: a piece
    of length ``L`` gets ``max(minimum, ⌈points·√L⌉)`` points — a short piece needs fewer for the
    same accuracy, though not proportionally fewer (the rule's error falls with the piece's length
    relative to the distance of the function's nearest singularity, and with the points) — so a
    receiver with ``s`` switches has at most ``points·√(s+1) + minimum·s`` nodes. Rows are padded
    with zero weights (at ``t = 1``)."""
    receivers = switches.at.shape[0]
    zeros = switches.at.new_zeros(receivers, 1)
    bounds = torch.cat([zeros, switches.at, zeros + 1], dim=1).tolist()  # sorted: padding is 1
    rules: dict[int, tuple[Tensor, Tensor]] = {}
    rows: list[tuple[Tensor, Tensor]] = []
    for edges in bounds:
        ts, ws = [], []
        for lo, hi in itertools.pairwise(edges):
            if hi <= lo:
                continue
            n = max(minimum, math.ceil(points * math.sqrt(hi - lo)))
            if n not in rules:
                rules[n] = gauss_legendre(n, switches.at)
            nodes, weights = rules[n]
            ts.append(lo + (hi - lo) * nodes)
            ws.append((hi - lo) * weights)
        rows.append((torch.cat(ts), torch.cat(ws)))
    width = max(len(t) for t, _ in rows)
    t_out = switches.at.new_ones(receivers, width)
    w_out = switches.at.new_zeros(receivers, width)
    for i, (t, w) in enumerate(rows):
        t_out[i, : len(t)], w_out[i, : len(w)] = t, w
    return t_out, w_out


def jump_width(switches: Switches, eps: float) -> Float[Tensor, "receiver slot"]:
    """Half the width of the interval around each switch on which the jump is measured:
    ``√eps`` of the dtype the block runs in (the jump's error, second order in the width, is
    then ``O(eps)``; a wider step than rounding, so the choice does flip), and at most a quarter
    of the distance to the nearest other switch or end of the path."""
    zeros = switches.at.new_zeros(switches.at.shape[0], 1)
    bounds = torch.cat([zeros, switches.at, zeros + 1], dim=1)
    room = torch.minimum(bounds[:, 1:-1] - bounds[:, :-2], bounds[:, 2:] - bounds[:, 1:-1])
    return torch.clamp(room / 4, max=eps**0.5)
