"""Integrated gradients through the feed-forward block (methods.md#the-feed-forward-block): pure
math, float64.

Invariants:
  * the closed form (element-wise activations) equals a brute-force Riemann-sum IG computed with
    autograd (midpoint rule, 4000 steps) for every supported activation;
  * Gauss–Legendre quadrature for gated blocks equals the same Riemann IG, with and without biases
    and with TransformerLens 2.x's b_in after the product;
  * completeness: Σ_j IG_ij = FF(u) − FF(u^b);
  * the a → 0 limit: inputs that hit a = 0 exactly give finite coefficients equal to act'(b');
  * the quadrature residual shrinks as points increase.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tl_normmix.decompose import feedforward
from tl_normmix.decompose.activations import ACTIVATIONS
from tl_normmix.decompose.blocks import MLPSpec

D, D_MLP, PARTS = 6, 10, 4
DTYPE = torch.float64


def _mlp(act_fn: str, gated: bool, seed: int = 0, *, bias_after_gate: bool = False) -> MLPSpec:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=DTYPE)

    return MLPSpec(
        act=ACTIVATIONS[act_fn],
        act_name=act_fn,
        W_in=rand(D, D_MLP),
        b_in=rand(D_MLP),
        W_out=rand(D_MLP, D),
        b_out=rand(D),
        W_gate=rand(D, D_MLP) if gated else None,
        b_gate=rand(D_MLP) if gated and not bias_after_gate else None,
        bias_after_gate=bias_after_gate,
    )


def _parts(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(PARTS, D, generator=gen, dtype=DTYPE),
        torch.randn(D, generator=gen, dtype=DTYPE),
    )


def _riemann_ig(mlp: MLPSpec, parts: torch.Tensor, bias: torch.Tensor, steps: int) -> torch.Tensor:
    """IG_j = Σ_s J(u(t_s)) u_j / steps along u(t) = bias + t Σ_j u_j (midpoint rule)."""
    t = (torch.arange(steps, dtype=DTYPE) + 0.5) / steps
    points = bias + t[:, None] * parts.sum(0)  # [steps, d]
    jac = torch.func.vmap(torch.func.jacrev(mlp.forward))(points)  # [steps, d_out, d_in]
    return torch.einsum("jd,sod->jo", parts, jac) / steps


def _fast_ig(mlp: MLPSpec, parts: torch.Tensor, bias: torch.Tensor, points=None) -> torch.Tensor:
    k = feedforward.ig_coefficients(mlp, parts.sum(0), bias, quadrature_points=points)
    k_in, k_gate = k.k_in.double(), k.k_gate.double() if k.k_gate is not None else None
    hidden = (parts @ mlp.W_in) * k_in
    if k_gate is not None:
        hidden = hidden + (parts @ mlp.W_gate) * k_gate
    return hidden @ mlp.W_out


@pytest.mark.parametrize("act_fn", sorted(ACTIVATIONS))
def test_closed_form_equals_riemann_ig(act_fn):
    mlp = _mlp(act_fn, gated=False)
    parts, bias = _parts()
    fast = _fast_ig(mlp, parts, bias)
    # The midpoint rule converges as 1/steps² for smooth activations, 1/steps across relu's kinks.
    tol = 2e-3 if act_fn == "relu" else 1e-5
    torch.testing.assert_close(fast, _riemann_ig(mlp, parts, bias, 4000), rtol=tol, atol=tol)
    # completeness (float32 coefficients)
    rebuilt = fast.sum(0) + mlp.forward(bias)
    torch.testing.assert_close(rebuilt, mlp.forward(parts.sum(0) + bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act_fn", ["silu", "gelu", "gelu_new"])
@pytest.mark.parametrize("bias_after_gate", [False, True], ids=["bias_inside", "tl2_bias_after"])
def test_gated_quadrature_equals_riemann_ig(act_fn, bias_after_gate):
    mlp = _mlp(act_fn, gated=True, bias_after_gate=bias_after_gate)
    parts, bias = _parts()
    fast = _fast_ig(mlp, parts, bias, points=feedforward.DEFAULT_QUADRATURE_POINTS)
    torch.testing.assert_close(fast, _riemann_ig(mlp, parts, bias, 4000), rtol=1e-5, atol=1e-6)


def test_quadrature_residual_shrinks_with_points():
    mlp = _mlp("silu", gated=True)
    parts, bias = 2.0 * _parts()[0], _parts()[1]
    target = mlp.forward(parts.sum(0) + bias) - mlp.forward(bias)
    residuals = []
    for points in (1, 2, 4, 8, 16):
        k = feedforward.ig_coefficients(mlp, parts.sum(0), bias, quadrature_points=points)
        got = (
            (parts.sum(0) @ mlp.W_in) * k.k_in.double()
            + (parts.sum(0) @ mlp.W_gate) * k.k_gate.double()
        ) @ mlp.W_out
        residuals.append(((got - target).norm() / target.norm()).item())
    assert all(b < a for a, b in itertools.pairwise(residuals)), residuals
    assert residuals[-1] < 1e-6 < residuals[0], residuals


@pytest.mark.parametrize("act_fn", ["gelu", "gelu_new", "silu", "relu"])
def test_zero_preactivation_limit_has_no_nans(act_fn):
    """a = 0 exactly (zero W_in columns, and parts that cancel): c = act'(b'), finite."""
    mlp = _mlp(act_fn, gated=False)
    W_in = mlp.W_in.clone()
    W_in[:, :3] = 0.0  # units 0-2 get a = 0 from any input
    mlp = MLPSpec(ACTIVATIONS[act_fn], act_fn, W_in, mlp.b_in, mlp.W_out, mlp.b_out)
    parts, bias = _parts()
    parts = torch.cat([parts, -parts])  # Σ_j u_j = 0 exactly: every a = 0
    for inputs in (_parts()[0], parts):
        k = feedforward.ig_coefficients(mlp, inputs.sum(0), bias)
        assert torch.isfinite(k.k_in).all()
        offset = bias @ mlp.W_in + mlp.b_in
        derivative = feedforward.derivative(mlp.act, offset)
        a = inputs.sum(0) @ mlp.W_in
        zero = a == 0
        assert zero[:3].all()
        torch.testing.assert_close(k.k_in.double()[zero], derivative[zero].to(DTYPE))
    fast = _fast_ig(mlp, parts, bias)
    torch.testing.assert_close(fast, _riemann_ig(mlp, parts, bias, 200), rtol=1e-5, atol=1e-6)


def test_gated_needs_quadrature_points():
    mlp = _mlp("silu", gated=True)
    parts, bias = _parts()
    with pytest.raises(ValueError, match="quadrature"):
        feedforward.ig_coefficients(mlp, parts.sum(0), bias)
    with pytest.raises(ValueError, match="at least 1"):
        feedforward.ig_coefficients(mlp, parts.sum(0), bias, quadrature_points=0)
