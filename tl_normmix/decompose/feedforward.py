"""Integrated gradients through the feed-forward block: pure tensor math
(methods.md#the-feed-forward-block).

The input of the feed-forward block at receiver ``i`` is decomposed as ``u_i = Σ_j u_ij + u^b_i``
(``u^b`` collects the bias terms). Along the straight path ``u(t) = u^b + t Σ_j u_ij`` the
integrated gradient of source ``j`` is linear in its own part:

* element-wise ``act``: ``IG_ij = ((u_ij W_in) ⊙ c_i) W_out`` with
  ``c_i = (act(a_i + b'_i) − act(b'_i)) / a_i``, ``a_i = Σ_j u_ij W_in``,
  ``b'_i = u^b_i W_in + b_in`` (``act'(b'_i + a_i/2)`` where ``|a_i| → 0``): closed form, no
  integration steps;
* gated ``(act(u W_gate + b_g) ⊙ (u W_in + b_in)) W_out``: ``IG_ij = ((u_ij W_gate) ⊙ K1_i +
  (u_ij W_in) ⊙ K2_i) W_out`` with ``K1 = ∫₀¹ act'(tA + g₀) ⊙ (tC + l₀) dt`` and
  ``K2 = ∫₀¹ act(tA + g₀) dt`` (``A, C`` the parts' pre-activations, ``g₀, l₀`` the bias
  path's), by Gauss–Legendre quadrature.

Either way ``Σ_j IG_ij = FF(u_i) − FF(u^b_i)`` (exactly for the closed form, to quadrature
accuracy for gated blocks), so the parts plus ``FF(u^b_i)`` rebuild the block's output. The
per-receiver coefficients are computed in float64 (they are ``N × d_ff``); the per-pair work
stays in the input dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tl_normmix.decompose.blocks import MLPSpec

__all__ = [
    "DEFAULT_QUADRATURE_POINTS",
    "IGCoefficients",
    "derivative",
    "flops_per_pair",
    "gauss_legendre",
    "ig_coefficients",
    "ig_hidden",
]

#: Gauss–Legendre points for gated blocks. methods.md#the-feed-forward-block quotes ~1e-11 at 16
#: points; on SmolLM2-135M (layer 2, large gate pre-activations) 16 points leave 1.5e-5 on the FF
#: output and 24 reach the float32 floor (5e-6), so the default keeps a margin. Each point costs
#: ``N·d_ff``, not per pair.
DEFAULT_QUADRATURE_POINTS = 32

#: Below this ``|a|`` the difference quotient loses precision; its limit is used instead.
_SMALL = 1e-6


@dataclass(frozen=True)
class IGCoefficients:
    """Per receiver and hidden unit: ``IG_ij = (P^in_ij ⊙ k_in + P^gate_ij ⊙ k_gate) W_out``
    where ``P^in_ij = u_ij W_in`` and ``P^gate_ij = u_ij W_gate`` (gated blocks only)."""

    k_in: Float[Tensor, "... d_mlp"]  # c_i (element-wise) or K2_i (gated)
    k_gate: Float[Tensor, "... d_mlp"] | None  # K1_i (gated) or None

    def rows(self, start: int, stop: int, *, pairs: bool = True) -> IGCoefficients:
        """Receivers ``start:stop`` of ``[batch, pos, d_mlp]`` coefficients, shaped to broadcast
        against pair tensors ``[batch, key, chunk, d_mlp]`` (``pairs=False``: against
        ``[batch, chunk, d_mlp]``)."""
        index = (
            (slice(None), None, slice(start, stop)) if pairs else (slice(None), slice(start, stop))
        )
        gate = self.k_gate[index] if self.k_gate is not None else None
        return IGCoefficients(k_in=self.k_in[index], k_gate=gate)

    def scaled(self, factor: Tensor) -> IGCoefficients:
        """The coefficients times ``factor`` (a per-receiver scale folded into one multiply)."""
        gate = self.k_gate * factor if self.k_gate is not None else None
        return IGCoefficients(k_in=self.k_in * factor, k_gate=gate)


def derivative(act: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``act'(x)`` element-wise, by autograd (``act`` is element-wise)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(act(leaf).sum(), leaf)
    return grad


@cache
def _nodes(points: int) -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = np.polynomial.legendre.leggauss(points)
    return (nodes + 1.0) / 2.0, weights / 2.0


def gauss_legendre(points: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Nodes and weights of the ``points``-point Gauss–Legendre rule on ``[0, 1]``."""
    if points < 1:
        raise ValueError(f"quadrature_points must be at least 1, got {points}.")
    nodes, weights = _nodes(points)
    return (
        torch.as_tensor(nodes, dtype=like.dtype, device=like.device),
        torch.as_tensor(weights, dtype=like.dtype, device=like.device),
    )


def ig_coefficients(
    mlp: MLPSpec,
    parts_sum: Float[Tensor, "*batch d_model"],
    bias_input: Float[Tensor, "*batch d_model"],
    *,
    quadrature_points: int | None = None,
) -> IGCoefficients:
    """The coefficients of methods.md#the-feed-forward-block for receivers with ``Σ_j u_ij =
    parts_sum`` and ``u^b = bias_input``. ``quadrature_points=None``: the closed form (element-wise
    ``act`` only); an integer: Gauss–Legendre quadrature with that many points (any block)."""
    act = mlp.act
    u, ub = parts_sum.double(), bias_input.double()
    W_in, b_in = mlp.W_in.double(), mlp.b_in.double()
    if not mlp.gated:
        a = u @ W_in  # the parts' pre-activation
        offset = ub @ W_in + b_in  # b'_i
        if quadrature_points is None:
            k = _difference_quotient(act, a, offset)
        else:
            nodes, weights = gauss_legendre(quadrature_points, a)
            k = torch.zeros_like(a)
            for t, w in zip(nodes, weights, strict=True):
                k += w * derivative(act, t * a + offset)
        return IGCoefficients(k_in=k.float(), k_gate=None)
    assert mlp.W_gate is not None
    if quadrature_points is None:
        raise ValueError("Gated feed-forward blocks need quadrature points.")
    W_gate = mlp.W_gate.double()
    b_gate = mlp.b_gate.double() if mlp.b_gate is not None else 0.0
    A, C = u @ W_gate, u @ W_in
    g0 = ub @ W_gate + b_gate
    l0 = ub @ W_in + (0.0 if mlp.bias_after_gate else b_in)  # TL 2.x adds b_in after the product
    nodes, weights = gauss_legendre(quadrature_points, A)
    k1, k2 = torch.zeros_like(A), torch.zeros_like(A)
    for t, w in zip(nodes, weights, strict=True):
        gate = t * A + g0
        k1 += w * derivative(act, gate) * (t * C + l0)
        k2 += w * act(gate)
    return IGCoefficients(k_in=k2.float(), k_gate=k1.float())


def _difference_quotient(act: Callable[[Tensor], Tensor], a: Tensor, offset: Tensor) -> Tensor:
    """``(act(a + b') − act(b')) / a``, and ``act'(b' + a/2)`` where ``|a| < 1e-6`` (the limit
    ``a → 0`` is ``act'(b')``; the midpoint keeps the error at ``O(a²)``)."""
    small = a.abs() < _SMALL
    safe = torch.where(small, torch.ones_like(a), a)
    quotient = (act(a + offset) - act(offset)) / safe
    if bool(small.any()):
        quotient = torch.where(small, derivative(act, offset + 0.5 * a), quotient)
    return quotient


def ig_hidden(
    pre_in: Float[Tensor, "... d_mlp"],
    pre_gate: Float[Tensor, "... d_mlp"] | None,
    k: IGCoefficients,
    *,
    inplace: bool = False,
) -> Float[Tensor, "... d_mlp"]:
    """The hidden-layer attribution ``P^in ⊙ k_in (+ P^gate ⊙ k_gate)``; times ``W_out`` it is
    ``IG_ij``. ``k``'s tensors broadcast against the parts (receivers on the right axis).
    ``inplace`` overwrites ``pre_in`` (and ``pre_gate``) instead of allocating."""
    if not inplace:
        out = pre_in * k.k_in
        if k.k_gate is not None:
            assert pre_gate is not None
            out = out + pre_gate * k.k_gate
        return out
    pre_in.mul_(k.k_in)
    if k.k_gate is not None:
        assert pre_gate is not None
        pre_in.add_(pre_gate.mul_(k.k_gate))
    return pre_in


def flops_per_pair(d_model: int, d_mlp: int, heads: int, gated: bool) -> int:
    """Multiply-adds ×2 of the per-pair work of one layer (methods.md#the-feed-forward-block, cost),
    per ``(i, j)``."""
    first = heads * d_mlp * (2 if gated else 1)
    return 2 * (first + d_mlp * d_model + heads * d_model)
