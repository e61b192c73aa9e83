"""Property-based tests (hypothesis) for the pure tensor math of methods.md#notation.

Small random shapes (batch 1-2, heads 1-4, pos 1-6, d_head 1-4, d_model 2-8) and seeds are drawn
by hypothesis; tensors are built in float64 from a seeded ``torch.Generator``. Invariants:
  * permuting heads consistently in pattern, v and W_O leaves the head-summed layer map and the
    mixing ratios unchanged (no residual, residual, LayerNorm chain in ``post``);
  * scaling W_O by c > 0 scales the head-summed and per-head ``attn_n`` maps by exactly c and, with
    no residual, leaves the mixing ratio unchanged;
  * a head whose W_O is zero contributes nothing: the layer map and ratios equal those computed
    with that head removed, and its per-head ``attn_n`` is zero;
  * mixing ratios are finite and lie in [0, 1], with and without residual and norm chains;
  * the Gram-form head-summed norms equal the norms of the materialised Σ_h α^h_ij f^h_j for any
    chunk size (1, one that does not divide the number of queries, the default), and
    ``decomposed_norms`` equals the norms of the materialised F_i(x_j) with residual and chains;
  * ``NormSpec.linear`` is linear, and completeness holds: Σ_k linear(x_k, s) + β == apply(x, s)
    == the real LayerNorm / RMSNorm of x, with s the scale of the whole x.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tl_normmix.decompose import attention
from tl_normmix.decompose.blocks import NormSpec
from tl_normmix.decompose.residual import NormChain, decomposed_norms

DTYPE = torch.float64
RTOL, ATOL = 1e-9, 1e-10
SETTINGS = settings(max_examples=40, deadline=None)

seeds = st.integers(0, 2**31 - 1)
batches = st.integers(1, 2)
heads = st.integers(1, 4)
positions = st.integers(1, 6)
d_heads = st.integers(1, 4)
d_models = st.integers(2, 8)
norm_kinds = st.sampled_from(["layernorm", "rmsnorm"])
# Which norms the chains hold: no residual / residual / residual + LayerNorm in ``post`` / ...
scopes = st.sampled_from(["attn", "attnres", "attnresln", "rms_post", "sandwich"])


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol=RTOL, atol=ATOL) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _inputs(seed, batch, n_heads, pos, d_head, d_model, causal=False):
    """(generator, pattern, v, W_O, residual) with softmax rows (optionally causal)."""
    gen = torch.Generator().manual_seed(seed)
    scores = 2.0 * torch.randn(batch, n_heads, pos, pos, generator=gen, dtype=DTYPE)
    if causal:
        upper = torch.ones(pos, pos, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(upper, float("-inf"))
    pattern = scores.softmax(-1)
    v = torch.randn(batch, pos, n_heads, d_head, generator=gen, dtype=DTYPE)
    W_O = torch.randn(n_heads, d_head, d_model, generator=gen, dtype=DTYPE)
    residual = torch.randn(batch, pos, d_model, generator=gen, dtype=DTYPE)
    return gen, pattern, v, W_O, residual


def _norm(gen, kind, d_model, with_bias=True):
    """A NormSpec with random γ (away from 0), β and ε."""
    weight = 1.0 + 0.5 * torch.randn(d_model, generator=gen, dtype=DTYPE)
    bias = torch.randn(d_model, generator=gen, dtype=DTYPE) if with_bias else None
    eps = float(10 ** (-6 * torch.rand(1, generator=gen, dtype=DTYPE).item()))
    return NormSpec(kind=kind, weight=weight, bias=bias, eps=eps)


def _chain(gen, kind, batch, pos, d_model):
    """A one-norm NormChain with random positive per-token scales ``[batch, pos, 1]``."""
    scale = 0.5 + torch.rand(batch, pos, 1, generator=gen, dtype=DTYPE)
    return NormChain([(_norm(gen, kind, d_model, with_bias=kind == "layernorm"), scale)])


def _cast(chain: NormChain, dtype: torch.dtype) -> NormChain:
    """The same chain with every tensor cast to ``dtype``."""
    out = []
    for n, scale in chain.norms:
        bias = None if n.bias is None else n.bias.to(dtype)
        out.append((NormSpec(n.kind, n.weight.to(dtype), bias, n.eps), scale.to(dtype)))
    return NormChain(out)


def _scope(gen, scope, residual, batch, pos, d_model):
    """(residual or None, pre chain, post chain) for one of ``scopes``."""
    if scope == "attn":
        return None, NormChain(), NormChain()
    if scope == "attnres":
        return residual, NormChain(), NormChain()
    if scope == "attnresln":
        return residual, NormChain(), _chain(gen, "layernorm", batch, pos, d_model)
    if scope == "rms_post":
        return residual, NormChain(), _chain(gen, "rmsnorm", batch, pos, d_model)
    pre = _chain(gen, "rmsnorm", batch, pos, d_model)  # sandwich: post-attention norm in pre
    return residual, pre, _chain(gen, "layernorm", batch, pos, d_model)


@SETTINGS
@given(seeds, batches, heads, positions, d_heads, d_models, scopes, st.booleans())
def test_head_permutation_leaves_layer_map_and_ratio_unchanged(
    seed, batch, n_heads, pos, d_head, d_model, scope, causal
):
    """Permuting heads consistently in pattern, v and W_O changes neither layer map nor ratio."""
    gen, pattern, v, W_O, residual = _inputs(seed, batch, n_heads, pos, d_head, d_model, causal)
    res, pre, post = _scope(gen, scope, residual, batch, pos, d_model)
    perm = torch.randperm(n_heads, generator=gen)
    norms, ratio = decomposed_norms(pattern, v, W_O, res, pre, post)
    p_norms, p_ratio = decomposed_norms(pattern[:, perm], v[:, :, perm], W_O[perm], res, pre, post)
    _close(p_norms, norms)
    _close(p_ratio, ratio)


@SETTINGS
@given(
    seeds,
    batches,
    heads,
    positions,
    d_heads,
    d_models,
    st.floats(0.01, 100.0, allow_nan=False, allow_infinity=False),
)
def test_scaling_W_O_scales_attn_n_linearly(seed, batch, n_heads, pos, d_head, d_model, c):
    """W_O → c·W_O (c > 0) scales head-summed and per-head attn_n by c; attn ratio unchanged."""
    _, pattern, v, W_O, _ = _inputs(seed, batch, n_heads, pos, d_head, d_model)
    f, cf = attention.source_vectors(v, W_O), attention.source_vectors(v, c * W_O)
    _close(attention.head_summed_norms(pattern, cf), c * attention.head_summed_norms(pattern, f))
    norms, ratio = decomposed_norms(pattern, v, W_O, None)
    c_norms, c_ratio = decomposed_norms(pattern, v, c * W_O, None)
    _close(c_norms, c * norms)
    _close(c_ratio, ratio)
    per_head = attention.per_head_norms(pattern, attention.value_norms(v, W_O))
    c_per_head = attention.per_head_norms(pattern, attention.value_norms(v, c * W_O))
    _close(c_per_head, c * per_head)


@SETTINGS
@given(seeds, batches, st.integers(2, 4), positions, d_heads, d_models, scopes, st.data())
def test_zero_W_O_head_contributes_nothing(seed, batch, n_heads, pos, d_head, d_model, scope, data):
    """A head with W_O = 0 adds nothing: maps equal those without it; its per-head attn_n is 0."""
    gen, pattern, v, W_O, residual = _inputs(seed, batch, n_heads, pos, d_head, d_model)
    res, pre, post = _scope(gen, scope, residual, batch, pos, d_model)
    dead = data.draw(st.integers(0, n_heads - 1), label="dead head")
    W_O[dead] = 0.0
    keep = [h for h in range(n_heads) if h != dead]
    norms, ratio = decomposed_norms(pattern, v, W_O, res, pre, post)
    k_norms, k_ratio = decomposed_norms(pattern[:, keep], v[:, :, keep], W_O[keep], res, pre, post)
    _close(norms, k_norms)
    _close(ratio, k_ratio)
    per_head = attention.per_head_norms(pattern, attention.value_norms(v, W_O))
    assert torch.equal(per_head[:, dead], torch.zeros_like(per_head[:, dead]))
    assert (per_head[:, keep] > 0).any()


@SETTINGS
@given(seeds, batches, heads, positions, d_heads, d_models, scopes, st.booleans(), st.booleans())
def test_mixing_ratios_are_finite_and_in_unit_interval(
    seed, batch, n_heads, pos, d_head, d_model, scope, causal, single
):
    """Mixing ratios are finite and lie in [0, 1] for every scope (float64 and float32)."""
    gen, pattern, v, W_O, residual = _inputs(seed, batch, n_heads, pos, d_head, d_model, causal)
    res, pre, post = _scope(gen, scope, residual, batch, pos, d_model)
    if single:
        pre, post = _cast(pre, torch.float32), _cast(post, torch.float32)
        pattern, v, W_O = pattern.float(), v.float(), W_O.float()
        res = None if res is None else res.float()
    norms, ratio = decomposed_norms(pattern, v, W_O, res, pre, post)
    assert ratio.shape == (batch, pos)
    assert torch.isfinite(ratio).all()
    assert ((ratio >= 0) & (ratio <= 1)).all(), ratio
    assert torch.isfinite(norms).all()
    assert (norms >= 0).all()


def _non_divisor(n: int) -> int:
    """A chunk size > 1 that does not divide ``n``."""
    return n - 1 if n >= 3 else n + 1


@SETTINGS
@given(seeds, batches, heads, positions, d_heads, d_models, st.booleans(), st.integers(1, 7))
def test_head_summed_norms_match_materialised_sum(
    seed, batch, n_heads, pos, d_head, d_model, causal, drawn_chunk
):
    """Gram-form ‖Σ_h α^h_ij f^h_j‖ equals the norm of the materialised sum, for any chunk size."""
    _, pattern, v, W_O, _ = _inputs(seed, batch, n_heads, pos, d_head, d_model, causal)
    f = attention.source_vectors(v, W_O)
    _close(f, torch.einsum("bjhd,hdm->bjhm", v, W_O))
    expected = torch.einsum("bhij,bjhm->bijm", pattern, f).norm(dim=-1)
    assert pos % _non_divisor(pos) != 0
    for chunk in (1, _non_divisor(pos), drawn_chunk, 256):
        _close(attention.head_summed_norms(pattern, f, chunk_size=chunk), expected)
    # attn_n scope of decomposed_norms: same map (the diagonal is built explicitly).
    norms, _ = decomposed_norms(pattern, v, W_O, None, chunk_size=_non_divisor(pos))
    _close(norms, expected)


def _through(chain: NormChain, parts: torch.Tensor) -> torch.Tensor:
    """Apply each norm of ``chain`` to ``parts`` [b, i, j, d] with the receiver i's scale."""
    for norm, scale in chain.norms:
        parts = norm.linear(parts, scale[:, :, None, :])
    return parts


@SETTINGS
@given(seeds, batches, heads, positions, d_heads, d_models, scopes, st.integers(1, 7))
def test_decomposed_norms_match_materialised_vectors(
    seed, batch, n_heads, pos, d_head, d_model, scope, chunk
):
    """‖F_i(x_j)‖, r_i equal those of the materialised F_i(x_j) = post(pre(Σ_h α f) + δ_ij x_i)."""
    gen, pattern, v, W_O, residual = _inputs(seed, batch, n_heads, pos, d_head, d_model)
    res, pre, post = _scope(gen, scope, residual, batch, pos, d_model)
    parts = torch.einsum("bhij,bjhd,hdm->bijm", pattern, v, W_O)  # [b, i, j, d]
    parts = _through(pre, parts)
    if res is not None:
        eye = torch.eye(pos, dtype=torch.bool)
        parts = parts + eye[None, :, :, None] * res[:, :, None, :]
    parts = _through(post, parts)
    off_diagonal = ~torch.eye(pos, dtype=torch.bool)
    context = (parts * off_diagonal[None, :, :, None]).sum(2).norm(dim=-1)
    own = parts.diagonal(dim1=1, dim2=2).norm(dim=1)  # [b, i]
    norms, ratio = decomposed_norms(pattern, v, W_O, res, pre, post, chunk_size=chunk)
    _close(norms, parts.norm(dim=-1))
    _close(ratio, context / (context + own))


def _scale(kind: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The norm's denominator for the whole input: sqrt(var + ε) or sqrt(mean x² + ε)."""
    if kind == "layernorm":
        return (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


@SETTINGS
@given(seeds, st.integers(1, 3), positions, d_models, norm_kinds, st.integers(1, 5), st.booleans())
def test_normspec_linear_is_linear_and_complete(
    seed, batch, pos, d_model, kind, n_parts, with_bias
):
    """NormSpec.linear is linear and Σ_k linear(x_k, s) + β == apply(x, s) == the norm of x."""
    gen = torch.Generator().manual_seed(seed)
    spec = _norm(gen, kind, d_model, with_bias=with_bias and kind == "layernorm")
    parts = torch.randn(n_parts, batch, pos, d_model, generator=gen, dtype=DTYPE)
    x = parts.sum(0)
    s = _scale(kind, x, spec.eps)

    a, b = torch.randn(2, generator=gen, dtype=DTYPE).tolist()
    y, z = parts[0], torch.randn_like(x)
    _close(spec.linear(a * y + b * z, s), a * spec.linear(y, s) + b * spec.linear(z, s))

    total = sum(spec.linear(part, s) for part in parts)
    if spec.bias is not None:
        total = total + spec.bias
    applied = spec.apply(x, s)
    _close(total, applied)

    if kind == "layernorm":
        expected = torch.nn.functional.layer_norm(x, (d_model,), spec.weight, spec.bias, spec.eps)
    else:
        expected = torch.nn.functional.rms_norm(x, (d_model,), spec.weight, spec.eps)
    _close(applied, expected, rtol=1e-7, atol=1e-9)
