"""Mixtures of experts split across router switches (methods.md, the feed-forward block): the
switch points, per-segment quadrature and the jump shares are checked against a router smoothed
at temperature ``T`` whose integrated gradients (a fine quadrature, no switch handling) converge
to ours as ``T → 0``."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from tl_normmix.decompose import generic_ff, router_path
from tl_normmix.decompose.blocks import FFModule, Router

D, EXPERTS, SOURCES = 6, 4, 3


def _experts(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(EXPERTS, D, 5, generator=g, dtype=torch.float64)
    B = torch.randn(EXPERTS, 5, D, generator=g, dtype=torch.float64)
    return A, B


def _expert_outputs(u: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """``h_e(u) = tanh(u A_e) B_e`` for every expert: ``[..., expert, d]``."""
    return torch.einsum("...eh,ehd->...ed", torch.tanh(torch.einsum("...d,edh->...eh", u, A)), B)


def _router(score: str, seed: int, top_k: int = 1) -> Router:
    g = torch.Generator().manual_seed(seed + 100)
    weight = torch.randn(D, EXPERTS, generator=g, dtype=torch.float64)
    bias = torch.randn(EXPERTS, generator=g, dtype=torch.float64) * 0.3
    choice = torch.randn(EXPERTS, generator=g, dtype=torch.float64) * 0.2
    if score == "sigmoid":
        return Router(weight, bias, top_k, "sigmoid", choice)
    return Router(weight, bias, top_k)


def _hard(router: Router, A: Tensor, B: Tensor) -> FFModule:
    """The mixture as the model computes it: the chosen experts' outputs, weighted by the
    softmax of their logits."""

    def forward(u: Tensor) -> Tensor:
        r = router.logits(u)
        chosen = router.chosen_by(r)
        gate = torch.softmax(r.masked_fill(~chosen, float("-inf")), dim=-1)
        return (gate[..., None] * _expert_outputs(u, A, B)).sum(-2)

    return FFModule(forward, "mixture", EXPERTS * 5, router=router)


def _smoothed(router: Router, A: Tensor, B: Tensor, temperature: float):
    """Top-1 with the step of the choice smoothed: ``Σ_e softmax(s/T)_e h_e(u)``."""

    def forward(u: Tensor) -> Tensor:
        choice = torch.softmax(router.scores(router.logits(u)) / temperature, dim=-1)
        return (choice[..., None] * _expert_outputs(u, A, B)).sum(-2)

    return forward


def _path(seed: int, receivers: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed + 7)
    parts = torch.randn(1, SOURCES, receivers, D, generator=g, dtype=torch.float64) * 1.5
    base = torch.randn(1, receivers, D, generator=g, dtype=torch.float64) * 0.5
    return parts, parts.sum(1), base


def _reference_ig(forward, parts: Tensor, total: Tensor, base: Tensor, points: int) -> Tensor:
    """Integrated gradients by the midpoint rule on ``points`` points (no switch handling)."""
    _, keys, receivers, _d = parts.shape
    t = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    out = torch.zeros_like(parts)
    for i in range(receivers):
        path = base[0, i] + t[:, None] * total[0, i]  # [P, d]
        for j in range(keys):
            tangent = parts[0, j, i].expand_as(path)
            derivative = torch.func.jvp(forward, (path,), (tangent,))[1]
            out[0, j, i] = derivative.mean(0)
    return out


@pytest.mark.parametrize("score", ["logits", "sigmoid"])
def test_switches_are_where_the_choice_changes(score: str) -> None:
    router = _router(score, seed=1, top_k=2)
    _parts, total, base = _path(1, receivers=16)
    switches = router_path.find_switches(router, base[0], total[0])
    assert switches.any
    for i in range(16):
        points = switches.at[i][switches.valid[i]]
        assert bool((points[1:] >= points[:-1]).all())
        for tau, entering, leaving in zip(
            points.tolist(),
            switches.entering[i][switches.valid[i]].tolist(),
            switches.leaving[i][switches.valid[i]].tolist(),
            strict=True,
        ):
            before = router.chosen(base[0, i] + (tau - 1e-7) * total[0, i])
            after = router.chosen(base[0, i] + (tau + 1e-7) * total[0, i])
            assert bool(after[entering]) and not bool(before[entering])
            assert bool(before[leaving]) and not bool(after[leaving])
        # nothing missed: the choice is constant between consecutive switches
        bounds = [0.0, *points.tolist(), 1.0]
        for lo, hi in itertools.pairwise(bounds):
            inside = torch.linspace(lo, hi, 41, dtype=torch.float64)[1:-1]
            chosen = router.chosen(base[0, i] + inside[:, None] * total[0, i])
            assert bool((chosen == chosen[:1]).all())


@pytest.mark.parametrize("score", ["logits", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_split_across_switches_is_complete(score: str, top_k: int) -> None:
    A, B = _experts(2)
    router = _router(score, seed=2, top_k=top_k)
    ff = _hard(router, A, B)
    parts, total, base = _path(2, receivers=12)
    assert router_path.find_switches(router, base[0], total[0]).any
    ig = generic_ff.integrated_gradients(ff, parts, total, base, points=32)
    expected = ff.forward(base + total) - ff.forward(base)
    residual = (ig.sum(1) - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert float(residual.max()) < 1e-8
    without = FFModule(ff.forward, "mixture", EXPERTS * 5)  # no router: the jumps are missed
    ig_blind = generic_ff.integrated_gradients(without, parts, total, base, points=32)
    blind = (ig_blind.sum(1) - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert float(blind.max()) > 1e-3


@pytest.mark.parametrize("score", ["logits", "sigmoid"])
def test_jump_shares_are_the_limit_of_a_smoothed_router(score: str) -> None:
    A, B = _experts(3)
    router = _router(score, seed=3)
    parts, total, base = _path(3, receivers=8)
    switched = router_path.find_switches(router, base[0], total[0]).valid.any(-1)
    keep = switched.nonzero().flatten()[:3]  # receivers whose path crosses a switch
    assert len(keep) == 3
    parts, total, base = parts[:, :, keep], total[:, keep], base[:, keep]
    ours = generic_ff.integrated_gradients(_hard(router, A, B), parts, total, base, points=48)
    errors = []
    for temperature in (3e-2, 3e-3, 3e-4):
        smooth = _smoothed(router, A, B, temperature)
        reference = _reference_ig(smooth, parts, total, base, points=200_000)
        errors.append(float((reference - ours).norm() / ours.norm()))
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 1e-4
