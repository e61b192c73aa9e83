"""Whole-layer scopes (METHODS §3) against a direct reference and against the cache.

The reference materialises every per-pair vector in float64: the feed-forward input parts u_ij
(``test_residual._reference`` of ``attnresln_n``), IG_ij by a brute-force Riemann sum with autograd
(midpoint rule, 500 steps), then the residual parts and the norm after them. Invariants:
  * completeness against the cache: the reference's parts plus bias terms rebuild the FF output,
    the stream after RES2 and (post-LN) the LN2 output at 1e-5 relative, on every family and mode;
    the fast path's own completeness residuals are below 1e-5 (closed form) / 1e-6 (gated, default
    the default points) and shrink with more quadrature points;
  * the fast maps and mixing ratios equal the reference's, with padding and any chunk size;
  * bad input: scopes a block cannot support, activations without a closed form (and the
    quadrature fallback when asked), non-element-wise activations, chunks that do not fit memory.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_rel_close, read_layers
from test_residual import _reference
from tiny_models import TL_MAJOR, run_with_cache, tokens

import tl_normmix as nm
from tl_normmix import whole_layer
from tl_normmix.blocks import BlockKind, MLPSpec
from tl_normmix.scopes import UnsupportedScopeError

STEPS = 500  # midpoint rule: error ~ 1/STEPS² for the smooth activations here


def _scopes(kind: BlockKind) -> list[str]:
    if kind is BlockKind.PARALLEL:
        return ["layer_n"]
    ff = ["attnreslnff_n", "attnreslnffres_n"]
    return [*ff, "attnreslnffresln_n", "layer_n"] if kind is BlockKind.POST_LN else [*ff, "layer_n"]


def _double(mlp: MLPSpec) -> MLPSpec:
    return dataclasses.replace(
        mlp,
        **{
            f.name: getattr(mlp, f.name).double()
            for f in dataclasses.fields(mlp)
            if isinstance(getattr(mlp, f.name), torch.Tensor)
        },
    )


def _riemann(mlp: MLPSpec, parts: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """IG_ij for parts [b, i, j, d] and bias [b, i, d], by the midpoint rule with autograd."""
    t = (torch.arange(STEPS, dtype=torch.float64) + 0.5) / STEPS
    points = bias[:, :, None, :] + t[:, None] * parts.sum(2)[:, :, None, :]  # [b, i, s, d]
    jac = torch.func.vmap(torch.func.vmap(torch.func.vmap(torch.func.jacrev(mlp.forward))))(
        points
    )  # [b, i, s, d_out, d_in]
    return torch.einsum("bijd,biod->bijo", parts, jac.mean(2))


def _through(t, name: str, parts: torch.Tensor, bias: torch.Tensor):
    norm, scale = t.norms[name], t[f"{name}.scale"]
    return norm.linear(parts, scale[:, :, None, :]), norm.apply(bias, scale)


def _reference_stages(t, mask: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Stage name -> (parts [b, i, j, d], bias [b, i, d]) in float64, every pair materialised."""
    kind = t.spec.kind
    mlp = _double(t.mlp)
    if kind is BlockKind.PARALLEL:
        parts, bias = (x.double() for x in _reference(t, "attnres_n", mask))
        ln2 = t.norms["ln2"]
        beta = (ln2.bias if ln2.bias is not None else torch.zeros(parts.shape[-1])).double()
        ff_bias = mlp.forward(beta.expand_as(bias))
        eye = torch.eye(parts.shape[1], dtype=torch.bool)[None, :, :, None]
        parts = parts + eye * (t["mlp_out"].double() - ff_bias)[:, :, None, :]
        return {"res": (parts, bias + ff_bias)}
    u, u_bias = (x.double() for x in _reference(t, "attnresln_n", mask))
    ig = _riemann(mlp, u, u_bias)
    ff_bias = mlp.forward(u_bias)
    stages = {"ff": (ig, ff_bias)}
    if kind is BlockKind.POST_LN:
        res, res_bias = u, u_bias
    else:
        res, res_bias = (x.double() for x in _reference(t, "attnres_n", mask))
    written, written_bias = ig, ff_bias
    if kind is BlockKind.SANDWICH:
        written, written_bias = _through(t, "ln2_post", ig, ff_bias)
    stages["res"] = (written + res, written_bias + res_bias)
    if kind is BlockKind.POST_LN:
        stages["final"] = _through(t, "ln2", *stages["res"])
    return stages


STAGE = {"attnreslnff_n": "ff", "attnreslnffres_n": "res", "attnreslnffresln_n": "final"}


def _stage_of(scope: str, kind: BlockKind) -> str:
    if scope == "layer_n":
        return "final" if kind is BlockKind.POST_LN else "res"
    return STAGE[scope]


def _target(t, stage: str) -> torch.Tensor:
    kind = t.spec.kind
    if stage == "ff":
        return t["mlp_out"]
    if stage == "res" and kind is BlockKind.POST_LN:
        return t["ln2.in"]
    return t["resid_post"]


def test_reference_completeness_against_the_cache(model):
    """Σ_j parts + bias terms of every stage equal what the model computed (1e-5 relative)."""
    toks = tokens()
    mask = torch.ones(toks.shape, dtype=torch.bool)
    _, layers = read_layers(model, toks)
    for t in layers:
        for stage, (parts, bias) in _reference_stages(t, mask).items():
            rebuilt = parts.sum(2) + bias
            assert_rel_close(rebuilt, _target(t, stage), what=f"layer {t.layer} {stage}")


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_fast_equals_reference(model, padded):
    toks = tokens(2, 7, seed=5)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3]) if padded else torch.ones(2, 7)
    kind = nm.adapt(model).spec.block.kind
    scopes = _scopes(kind)
    _, cache = run_with_cache(model, toks, mask.long(), names_filter=nm.hook_filter(model, scopes))
    maps = nm.mixing_maps(model, cache, scopes, attention_mask=mask, chunk_size=3)
    real = mask.bool()
    pair = real[:, :, None] & real[:, None, :]
    _, layers = read_layers(model, toks, mask=mask.long() if padded else None)
    for index, t in enumerate(layers):
        stages = _reference_stages(t, real)
        for scope in scopes:
            parts, _ = stages[_stage_of(scope, kind)]
            expected = parts.norm(dim=-1).masked_fill(~pair, 0.0)
            what = f"{scope} layer {index}"
            assert_rel_close(maps[scope][index], expected, rtol=1e-4, what=what)
            eye = torch.eye(parts.shape[1], dtype=torch.bool)[None, :, :, None]
            context = parts.masked_fill(eye, 0.0).sum(2).norm(dim=-1)
            own = parts.diagonal(dim1=1, dim2=2).norm(dim=1)
            ratio = maps.mixing_ratio(scope)[index]
            assert_rel_close(ratio[real], (context / (context + own))[real], rtol=1e-4, what=what)
            assert ratio[~real].isnan().all()
            residual = maps.completeness[scope][index]
            assert residual[~real].isnan().all()
            limit = 1e-6 if t.mlp.gated else 1e-5  # gated: default Gauss–Legendre points
            assert residual[real].max() < limit, (scope, residual.max())


def test_chunk_size_does_not_change_the_maps(model):
    kind = nm.adapt(model).spec.block.kind
    scopes = _scopes(kind)
    _, cache = run_with_cache(model, tokens(), names_filter=nm.hook_filter(model, scopes))
    full = nm.mixing_maps(model, cache, scopes)
    for chunk in (1, 4):
        chunked = nm.mixing_maps(model, cache, scopes, chunk_size=chunk)
        for scope in scopes:
            assert_rel_close(chunked[scope], full[scope], rtol=1e-5, what=f"{scope} {chunk}")


GATED = ["llama", "gemma2"] if TL_MAJOR >= 4 else ["llama"]


@pytest.mark.parametrize("family", GATED)
def test_gated_residual_shrinks_with_quadrature_points(family, hf_root):
    from tiny_models import Case, build

    model = build(Case(family, "raw"), hf_root)
    _, cache = run_with_cache(model, tokens(), names_filter=nm.hook_filter(model, "attnreslnff_n"))
    worst = [
        nm.mixing_maps(model, cache, "attnreslnff_n", quadrature_points=p)
        .completeness["attnreslnff_n"]
        .max()
        .item()
        for p in (1, 2, 4)
    ]
    assert worst[0] > worst[1] > worst[2], worst
    default = nm.mixing_maps(model, cache, "attnreslnff_n").completeness["attnreslnff_n"]
    assert default.max() < 1e-6 < worst[0]


def test_unsupported_scopes_say_why(model):
    kind = nm.adapt(model).spec.block.kind
    if kind is BlockKind.PARALLEL:
        with pytest.raises(UnsupportedScopeError, match=r"LN2 of the layer input.*layer_n"):
            nm.hook_filter(model, "attnreslnff_n")
    elif kind is not BlockKind.POST_LN:
        with pytest.raises(UnsupportedScopeError, match=r"post-LN.*attnreslnffres_n"):
            nm.hook_filter(model, "attnreslnffresln_n")
    else:
        nm.hook_filter(model, "attnreslnffresln_n")  # supported


def _first_layer(model):
    _, layers = read_layers(model, tokens(), layers=[0])
    t = layers[0]
    mask = torch.ones(t.batch, t.pos, dtype=torch.bool)
    return t, mask


def test_unknown_activation_needs_quadrature(hf_root):
    """An activation without a closed form is refused unless quadrature is asked for; then the
    model's own activation is integrated numerically and agrees with the closed form."""
    from tiny_models import Case, build

    model = build(Case("gpt2", "raw"), hf_root)
    t, mask = _first_layer(model)
    exact = whole_layer.whole_layer_maps(t, t.pattern, mask, ["attnreslnff_n"])
    mystery = dataclasses.replace(t.mlp, act_fn="mystery", act=t.mlp.activation)
    odd = dataclasses.replace(t, mlp=mystery)
    with pytest.raises(NotImplementedError, match=r"'mystery'.*quadrature_points"):
        whole_layer.whole_layer_maps(odd, t.pattern, mask, ["attnreslnff_n"])
    options = whole_layer.FFOptions(quadrature_points=32)
    numeric = whole_layer.whole_layer_maps(odd, t.pattern, mask, ["attnreslnff_n"], options)
    assert_rel_close(numeric.maps["attnreslnff_n"], exact.maps["attnreslnff_n"], rtol=1e-5)
    solu = dataclasses.replace(t, mlp=dataclasses.replace(t.mlp, act_fn="solu_ln"))
    with pytest.raises(NotImplementedError, match="not element-wise"):
        whole_layer.whole_layer_maps(solu, t.pattern, mask, ["attnreslnff_n"], options)


def test_chunk_that_does_not_fit_names_one_that_does(hf_root, monkeypatch):
    from tiny_models import Case, build

    model = build(Case("gpt2", "raw"), hf_root)
    t, mask = _first_layer(model)
    d, d_mlp = t.W_O.shape[-1], t.mlp.W_in.shape[1]
    per_query = whole_layer.chunk_bytes(t.batch, t.pos, 1, d, d_mlp, False)
    fixed = whole_layer.fixed_bytes(t.batch, t.pos, t.v.shape[2], d, d_mlp, False)
    monkeypatch.setattr(whole_layer, "available_bytes", lambda device: fixed + 3 * per_query)
    options = whole_layer.FFOptions(chunk_size=7)
    with pytest.raises(MemoryError, match=r"chunk_size=7 needs.*chunk_size=3 would fit"):
        whole_layer.whole_layer_maps(t, t.pattern, mask, ["attnreslnff_n"], options)
    ok = whole_layer.whole_layer_maps(
        t, t.pattern, mask, ["attnreslnff_n"], whole_layer.FFOptions(chunk_size=3)
    )
    assert ok.maps["attnreslnff_n"].shape == (t.batch, t.pos, t.pos)
    monkeypatch.setattr(whole_layer, "available_bytes", lambda device: fixed // 2)
    with pytest.raises(MemoryError, match="no chunk size fits"):
        whole_layer.whole_layer_maps(t, t.pattern, mask, ["attnreslnff_n"], options)


@pytest.mark.skipif(TL_MAJOR >= 4, reason="mixture-of-experts HookedTransformer: TL 2.x job")
def test_mixture_of_experts_is_refused_naming_the_layer():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        n_ctx=16,
        d_head=4,
        n_heads=4,
        d_mlp=32,
        d_vocab=50,
        act_fn="silu",
        normalization_type="RMS",
        gated_mlp=True,
        num_experts=4,
        experts_per_token=2,
    )
    model = HookedTransformer(cfg).eval()
    toks = torch.randint(0, 50, (1, 5))
    _, cache = run_with_cache(model, toks, names_filter=nm.hook_filter(model, "attn_n"))
    nm.mixing_maps(model, cache, "attn_n")  # attention-block scopes still work
    _, cache = run_with_cache(model, toks, names_filter=nm.hook_filter(model, "layer_n"))
    with pytest.raises(nm.UnsupportedModelError, match=r"Layer 0 .*mixture of experts"):
        nm.mixing_maps(model, cache, "layer_n")
