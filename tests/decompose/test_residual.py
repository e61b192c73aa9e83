"""Attention-block maps (methods.md#attention-weights-and-norms) against a direct reference and
against the cache.

The reference (``tests/reference.py``) materialises every per-pair vector F_i(x_j)
([batch, query, key, d_model]) through the layout's chains of norms, so it is obviously correct
and slow. Invariants, on every family and mode of the installed TransformerLens:
  * completeness: Σ_j F_i(x_j) plus the bias terms equals what the model computed — the pure
    attention output (attn_n), the stream after the residual add (attnres_n), the feed-forward
    input (attnresln_n) — at 1e-5 relative;
  * the fast maps and mixing ratios equal the reference's norms, with and without padding, and
    from half-precision caches;
  * scopes a layout cannot support are refused with the reason.
"""

from __future__ import annotations

import pytest
import torch
from helpers import reference
from helpers.checks import assert_rel_close, read_layers
from helpers.tiny_models import TL_MAJOR, build, drops_causal_mask, run_with_cache, runs, tokens

import tl_normmix as nm
from tl_normmix.maps import SCOPES, UnsupportedScopeError

NORM_SCOPES = ("attn_n", "attnres_n", "attnresln_n")
WHICH = {"attn_n": "attn", "attnres_n": "attn_res", "attnresln_n": "attn_res_ln"}


def _supported(model) -> list[str]:
    layout = nm.adapt(model).layout
    out = []
    for name in NORM_SCOPES:
        try:
            SCOPES[name].check_layout(layout)
        except UnsupportedScopeError:
            continue
        out.append(name)
    return out


def _target(t, scope: str, cache) -> torch.Tensor:
    """What the model computed for ``scope``, from the cache (not rebuilt from the layout)."""
    layout = t.layout
    mid = f"blocks.{t.layer}.hook_resid_mid"  # TL 2.x HookedTransformer: r + attn_out
    if scope == "attn_n":
        return t["attn_out"]
    if scope == "attnres_n":
        if layout.mid and f"{layout.mid[0]}.in" in t:
            return t[f"{layout.mid[0]}.in"]
        if not layout.parallel and layout.mlp_in and f"{layout.mlp_in[0]}.in" in t:
            return t[f"{layout.mlp_in[0]}.in"]
        if not layout.parallel and not layout.mid and not layout.mlp_in and "mlp_in" in t:
            return t["mlp_in"]
        if not layout.has_mlp and not layout.mid and not layout.post:
            return t["resid_post"]  # attention-only blocks: the block output is r + attn_out
        if TL_MAJOR < 4 and not layout.parallel:
            return cache[mid].float()
        written = t["attn_out"]  # parallel blocks: no hook holds r + attn_out
        for name in layout.attn_out:
            written = t.norms[name].apply(written, t.scale(name))
        return t["resid_pre"] + written
    last = layout.ff_input[-1]
    return t[f"{last}.out"] if f"{last}.out" in t else t["mlp_in"]


@pytest.mark.parametrize("scope", NORM_SCOPES)
def test_completeness_against_the_cache(model, scope):
    if scope not in _supported(model):
        with pytest.raises(UnsupportedScopeError, match="not defined for"):
            nm.hook_filter(model, scope)
        return
    toks = tokens()
    mask = torch.ones(toks.shape, dtype=torch.bool)
    _, layers = read_layers(model, toks)
    _, cache = run_with_cache(model, toks)
    for t in layers:
        parts, bias = reference.attention_block(t, WHICH[scope], mask)
        target = _target(t, scope, cache)
        assert_rel_close(parts.sum(2) + bias, target, what=f"{scope} layer {t.layer}")


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_fast_equals_reference(model, padded):
    toks = tokens(2, 7, seed=5)
    mask = (
        torch.tensor([[1] * 7, [1] * 4 + [0] * 3]) if padded else torch.ones(2, 7, dtype=torch.long)
    )
    scopes = _supported(model)
    run_mask = mask if padded else None
    _, cache = run_with_cache(model, toks, run_mask, names_filter=nm.hook_filter(model, scopes))
    if padded and drops_causal_mask(model):
        with pytest.raises(nm.VerificationError, match="future positions"):
            nm.mixing_maps(model, cache, scopes, attention_mask=mask)
        return
    maps = nm.mixing_maps(model, cache, scopes, attention_mask=mask)
    real = mask.bool()
    pair = real[:, :, None] & real[:, None, :]
    _, layers = read_layers(model, toks, mask=run_mask)
    for index, t in enumerate(layers):
        for scope in scopes:
            parts, _ = reference.attention_block(t, WHICH[scope], real)
            expected = parts.norm(dim=-1).masked_fill(~pair, 0.0)
            assert_rel_close(maps[scope][index], expected, rtol=1e-4, what=f"{scope} {index}")
            eye = torch.eye(parts.shape[1], dtype=torch.bool)[None, :, :, None]
            context = parts.masked_fill(eye, 0.0).sum(2).norm(dim=-1)
            own = parts.diagonal(dim1=1, dim2=2).norm(dim=1)
            ratio = (context / (context + own))[real]
            assert_rel_close(maps.mixing_ratio(scope)[index][real], ratio, rtol=1e-4, what=scope)
            assert maps.mixing_ratio(scope)[index][~real].isnan().all()
    t = layers[0]
    pattern = t.pattern.masked_fill(~pair[:, None], 0.0)
    f = torch.einsum("bjhd,hdm->bjhm", t.v, t.W_O)
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
    model = build(case, hf_root, dtype=dtype)
    if not runs(model):
        with pytest.raises(nm.UnsupportedModelError, match="TransformerLens cannot run"):
            nm.adapt(model)
        return
    scopes = _supported(model)
    toks = tokens()
    _, cache = run_with_cache(model, toks, names_filter=nm.hook_filter(model, scopes))
    maps = nm.mixing_maps(model, cache, scopes)
    mask = torch.ones(toks.shape, dtype=torch.bool)
    _, layers = read_layers(model, toks)
    for scope in scopes:
        assert maps[scope].dtype == torch.float32
        for index, t in enumerate(layers):
            expected = reference.attention_block(t, WHICH[scope], mask)[0].norm(dim=-1)
            assert_rel_close(maps[scope][index], expected, rtol=1e-4, what=f"{dtype} {scope}")


def test_unsupported_attention_scope_says_why(model):
    layout = nm.adapt(model).layout
    if layout.parallel:
        with pytest.raises(UnsupportedScopeError, match=r"parallel blocks.*attnres_n"):
            nm.hook_filter(model, "attnresln_n")
    elif "attnresln_n" not in _supported(model):
        with pytest.raises(UnsupportedScopeError, match=r"no norm reads.*attnres_n"):
            nm.hook_filter(model, "attnresln_n")
    else:
        assert TL_MAJOR < 4 or layout.ff_input
