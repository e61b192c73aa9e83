"""Norm-based scopes (METHODS §1–2) against a direct reference and against the cache.

The reference materialises every per-pair vector F_i(x_j) ([batch, query, key, d_model], and
[batch, head, query, key, d_model] per head), so it is obviously correct and slow. Invariants:
  * completeness: Σ_j F_i(x_j) plus the bias terms equals what the model computed — the pure
    attention output (attn), the stream after the residual add (attnres), the output of the norm
    that reads it (attnresln) — at 1e-5 relative, on every family and mode;
  * the fast maps and mixing ratios equal the reference's norms, with and without padding.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_rel_close
from tiny_models import run_with_cache, tokens

import tl_normmix as nm
from tl_normmix.blocks import BlockKind
from tl_normmix.scopes import NORM_CHAINS, NORM_SCOPES, UnsupportedScopeError


def _reference(t, scope: str, mask: torch.Tensor):
    """(parts [b, i, j, d], bias [b, i, d]) with masked keys dropped."""
    pair = mask[:, None, :, None] & mask[:, None, None, :]
    alpha = t.pattern.masked_fill(~pair, 0.0)
    f = torch.einsum("bjhd,hdm->bjhm", t.v, t.W_O)
    parts = torch.einsum("bhij,bjhm->bijm", alpha, f)
    bias = t.b_O.expand(parts.shape[0], parts.shape[1], -1)
    if scope == "attn_n":
        return parts, bias
    pre, post = NORM_CHAINS[(scope, t.spec.kind)]

    def through(names, parts, bias):
        for name in names:
            norm, scale = t.norms[name], t[f"{name}.scale"]
            parts = norm.linear(parts, scale[:, :, None, :])
            bias = norm.apply(bias, scale)
        return parts, bias

    parts, bias = through(pre, parts, bias)
    eye = torch.eye(parts.shape[1], dtype=torch.bool)
    parts = parts + eye[None, :, :, None] * t["resid_pre"][:, :, None, :]
    return through(post, parts, bias)


def _target(t, scope: str) -> torch.Tensor:
    kind = t.spec.kind
    if scope == "attn_n":
        return t["attn_out"]
    if scope == "attnres_n":
        if kind is BlockKind.POST_LN:
            return t["ln1.in"]
        return t["resid_pre"] + t["attn_out"] if kind is BlockKind.PARALLEL else t["resid_mid"]
    reader = "ln1" if kind is BlockKind.POST_LN else "ln2"
    if f"{reader}.out" in t.hooks:
        return t[f"{reader}.out"]
    return t.norms[reader].apply(t[f"{reader}.in"], t[f"{reader}.scale"])  # TL 2.x RMSNorm


def _layers(model, toks, scope, mask=None):
    adapter = nm.adapt(model)
    roles = set(adapter.layout.hooks) - {"mlp_pre_linear"}
    _, cache = run_with_cache(model, toks, mask)
    return [adapter.read(cache, layer, roles) for layer in range(adapter.spec.n_layers)]


def _supported(model, scope):
    kind = nm.adapt(model).spec.block.kind
    return scope != "attnresln_n" or kind is not BlockKind.PARALLEL


@pytest.mark.parametrize("scope", NORM_SCOPES)
def test_completeness_against_the_cache(model, scope):
    if not _supported(model, scope):
        with pytest.raises(UnsupportedScopeError, match="parallel"):
            nm.hook_filter(model, scope)
        return
    toks = tokens()
    mask = torch.ones(toks.shape, dtype=torch.bool)
    for t in _layers(model, toks, scope):
        parts, bias = _reference(t, scope, mask)
        assert_rel_close(parts.sum(2) + bias, _target(t, scope), what=f"{scope} layer {t.layer}")


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_fast_equals_reference(model, padded):
    toks = tokens(2, 7, seed=5)
    mask = (
        torch.tensor([[1] * 7, [1] * 4 + [0] * 3]) if padded else torch.ones(2, 7, dtype=torch.long)
    )
    scopes = [s for s in NORM_SCOPES if _supported(model, s)]
    _, cache = run_with_cache(model, toks, mask, names_filter=nm.hook_filter(model, scopes))
    maps = nm.mixing_maps(model, cache, scopes, attention_mask=mask)
    real = mask.bool()
    pair = real[:, :, None] & real[:, None, :]
    for scope in scopes:
        for index, t in enumerate(_layers(model, toks, scope, mask)):
            parts, _ = _reference(t, scope, real)
            expected = parts.norm(dim=-1).masked_fill(~pair, 0.0)
            assert_rel_close(maps[scope][index], expected, rtol=1e-4, what=f"{scope} {index}")
            eye = torch.eye(parts.shape[1], dtype=torch.bool)[None, :, :, None]
            context = parts.masked_fill(eye, 0.0).sum(2).norm(dim=-1)
            own = parts.diagonal(dim1=1, dim2=2).norm(dim=1)
            ratio = (context / (context + own))[real]
            assert_rel_close(maps.mixing_ratio(scope)[index][real], ratio, rtol=1e-4, what=scope)
            assert maps.mixing_ratio(scope)[index][~real].isnan().all()
    pattern = cache["blocks.0.attn.hook_pattern"].float().masked_fill(~pair[:, None], 0.0)
    f = torch.einsum(
        "bjhd,hdm->bjhm",
        _layers(model, toks, "attn_n", mask)[0].v,
        model.blocks[0].attn.W_O.float(),
    )
    per_head = torch.einsum("bhij,bjhm->bhijm", pattern, f).norm(dim=-1)
    assert_rel_close(maps.heads["attn_n"][0], per_head, rtol=1e-4, what="attn_n per head")


def test_weight_scopes(model):
    toks = tokens()
    _, cache = run_with_cache(model, toks)
    maps = nm.mixing_maps(model, cache, ("attn_w", "attnres_w"))
    eye = torch.eye(7)
    assert torch.allclose(maps["attnres_w"], 0.5 * maps["attn_w"] + 0.5 * eye)
    off = (maps["attn_w"] * (1 - eye)).sum(-1)
    assert torch.allclose(maps.mixing_ratio("attn_w"), off)
    assert torch.allclose(maps.mixing_ratio("attnres_w"), 0.5 * off)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cache_fast_equals_reference(case, hf_root, dtype):
    """A half-precision cache is upcast once; the fast path then matches the reference."""
    from tiny_models import build

    model = build(case, hf_root, dtype=dtype)
    scopes = [s for s in NORM_SCOPES if _supported(model, s)]
    toks = tokens()
    _, cache = run_with_cache(model, toks, names_filter=nm.hook_filter(model, scopes))
    maps = nm.mixing_maps(model, cache, scopes)
    mask = torch.ones(toks.shape, dtype=torch.bool)
    for scope in scopes:
        assert maps[scope].dtype == torch.float32
        for index, t in enumerate(_layers(model, toks, scope)):
            expected = _reference(t, scope, mask)[0].norm(dim=-1)
            assert_rel_close(maps[scope][index], expected, rtol=1e-4, what=f"{dtype} {scope}")
