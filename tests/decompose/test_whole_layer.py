"""Whole-layer scopes (methods.md#the-feed-forward-block) against a direct reference and against the
cache.

The reference (``tests/reference.py``) materialises every per-pair vector in float64: the
feed-forward input parts u_ij, IG_ij by a brute-force Riemann sum with autograd, then the FF
output's chain, the residual parts and the post norms of the layout. Invariants, on every family
and mode of the installed TransformerLens:
  * completeness against the cache: the reference's parts plus bias terms rebuild the FF output,
    the stream after RES2 and (post-LN) the block output at 1e-5 relative;
  * the fast maps, mixing ratios and completeness residuals agree with the reference, with
    padding and any chunk size; the generic (mixture-of-experts) path included;
  * bad input: scopes a block cannot support, non-element-wise activations, chunks that do not
    fit memory.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from helpers import reference
from helpers.checks import assert_rel_close, read_layers
from helpers.tiny_models import (
    TL_MAJOR,
    Case,
    build,
    drops_causal_mask,
    mlp_of,
    run_with_cache,
    tokens,
)

import tl_normmix as nm
from tl_normmix import memory
from tl_normmix.decompose import whole_layer
from tl_normmix.decompose.blocks import FFModule, Stage
from tl_normmix.maps.scopes import SCOPES, WHOLE_LAYER_SCOPES, UnsupportedScopeError
from tl_normmix.models import ff_module


def _scopes(model) -> list[str]:
    layout = nm.adapt(model).layout
    out = []
    for name in WHOLE_LAYER_SCOPES:
        try:
            SCOPES[name].check_layout(layout)
        except UnsupportedScopeError:
            continue
        out.append(name)
    return out


def _kept(scope: str, layout) -> str:
    """The reference stage of ``scope``."""
    if layout.parallel or not layout.has_mlp:
        return "out"
    if scope in ("layer_n", "attnreslnffresln_n"):
        return "final" if layout.post else "res"
    return {"attnreslnff_n": "ff", "attnreslnffres_n": "res"}[scope]


def _target(t, stage: str) -> torch.Tensor:
    if stage == "ff":
        return t["mlp_out"]
    if stage == "res" and t.layout.post:
        return t["post_in"]
    return t["resid_post"]


def _generic(case: Case) -> bool:
    return mlp_of(case) == "module"


def _kinked(t) -> bool:
    """ReLU: the reference's midpoint rule converges as 1/steps across the kink (3e-3 here)."""
    name = getattr(t.mlp, "act_name", "")
    return "relu" in name.lower() and "squared" not in name.lower()


def test_reference_completeness_against_the_cache(case, model):
    """Σ_j parts + bias terms of every stage equal what the model computed (1e-5 relative)."""
    toks = tokens(1, 5) if _generic(case) else tokens()
    mask = torch.ones(toks.shape, dtype=torch.bool)
    _, layers = read_layers(model, toks)
    for t in layers:
        for stage, (parts, bias) in reference.whole_layer(t, mask).items():
            rebuilt = parts.sum(2) + bias
            rtol = 3e-3 if _kinked(t) else 1e-4 if isinstance(t.mlp, FFModule) else 1e-5
            assert_rel_close(rebuilt, _target(t, stage), rtol, what=f"layer {t.layer} {stage}")


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_fast_equals_reference(case, model, padded):
    generic = _generic(case)
    n = 5 if generic else 7
    toks = tokens(2, n, seed=5)
    mask = torch.tensor([[1] * n, [1] * 4 + [0] * (n - 4)]) if padded else torch.ones(2, n)
    scopes = _scopes(model)
    run_mask = mask.long() if padded else None
    _, cache = run_with_cache(model, toks, run_mask, names_filter=nm.hook_filter(model, scopes))
    if padded and drops_causal_mask(model):
        with pytest.raises(nm.VerificationError, match="future positions"):
            nm.mixing_maps(model, cache, scopes, attention_mask=mask)
        return
    maps = nm.mixing_maps(
        model, cache, scopes, attention_mask=mask, options=nm.FFOptions(chunk_size=3)
    )
    real = mask.bool()
    pair = real[:, :, None] & real[:, None, :]
    _, layers = read_layers(model, toks, mask=mask.long() if padded else None)
    for index, t in enumerate(layers):
        stages = reference.whole_layer(t, real)
        for scope in scopes:
            parts, _ = stages[_kept(scope, t.layout)]
            expected = parts.norm(dim=-1).masked_fill(~pair, 0.0)
            what = f"{scope} layer {index}"
            # generic: quadrature vs Riemann of a float32 module; ReLU: the Riemann reference
            rtol = 2e-3 if generic else 3e-3 if _kinked(t) else 1e-4
            rows = real
            got = maps[scope][index].masked_fill(~rows[:, :, None], 0.0)
            want = expected.masked_fill(~rows[:, :, None], 0.0)
            assert_rel_close(got, want.float(), rtol=rtol, what=what)
            eye = torch.eye(parts.shape[1], dtype=torch.bool)[None, :, :, None]
            context = parts.masked_fill(eye, 0.0).sum(2).norm(dim=-1)
            own = parts.diagonal(dim1=1, dim2=2).norm(dim=1)
            ratio = maps.mixing_ratio(scope)[index]
            want = (context / (context + own))[rows]
            assert_rel_close(ratio[rows], want, rtol=rtol, what=what)
            assert ratio[~real].isnan().all()
            residual = maps.completeness[scope][index]
            assert residual[~real].isnan().all()
            if not generic:
                limit = 1e-6 if t.mlp is not None and t.mlp.gated else 1e-5
                assert residual[real].max() < limit, (scope, residual.max())


def test_chunk_size_does_not_change_the_maps(case, model):
    scopes = _scopes(model)
    toks = tokens(1, 5) if _generic(case) else tokens()
    _, cache = run_with_cache(model, toks, names_filter=nm.hook_filter(model, scopes))
    full = nm.mixing_maps(model, cache, scopes)
    for chunk in (1, 4):
        chunked = nm.mixing_maps(model, cache, scopes, options=nm.FFOptions(chunk_size=chunk))
        for scope in scopes:
            assert_rel_close(chunked[scope], full[scope], rtol=1e-5, what=f"{scope} {chunk}")


def test_unsupported_scopes_say_why(model):
    layout = nm.adapt(model).layout
    if layout.parallel:
        with pytest.raises(UnsupportedScopeError, match=r"a norm of the layer input.*layer_n"):
            nm.hook_filter(model, "attnreslnff_n")
    elif not layout.has_mlp:
        with pytest.raises(UnsupportedScopeError, match=r"no feed-forward part.*layer_n"):
            nm.hook_filter(model, "attnreslnff_n")
    elif not layout.post:
        with pytest.raises(UnsupportedScopeError, match=r"second residual.*attnreslnffres_n"):
            nm.hook_filter(model, "attnreslnffresln_n")
    else:
        nm.hook_filter(model, "attnreslnffresln_n")  # supported


GATED = ["llama", "gemma2"]


@pytest.mark.parametrize("family", GATED)
def test_gated_residual_shrinks_with_quadrature_points(family, hf_root):
    model = build(Case(family, "raw"), hf_root)
    _, cache = run_with_cache(model, tokens(), names_filter=nm.hook_filter(model, "attnreslnff_n"))
    worst = []
    for points in (1, 2, 4):
        options = nm.FFOptions(quadrature_points=points)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", nm.CompletenessWarning)
            maps = nm.mixing_maps(model, cache, "attnreslnff_n", options=options)
        worst.append(maps.completeness["attnreslnff_n"].max().item())
        warned = any(issubclass(w.category, nm.CompletenessWarning) for w in caught)
        assert warned == (worst[-1] > 1e-4), (points, worst[-1])  # too few points: said so
    assert worst[0] > worst[1] > worst[2], worst
    default = nm.mixing_maps(model, cache, "attnreslnff_n").completeness["attnreslnff_n"]
    assert default.max() < 1e-6 < worst[0]


def _first_layer(model, pos: int = 7):
    _, layers = read_layers(model, tokens(2, pos), layers=[0])
    t = layers[0]
    mask = torch.ones(t.batch, t.pos, dtype=torch.bool)
    return t, mask


FF = {"attnreslnff_n": Stage.FF}


def test_non_elementwise_activation_is_refused(hf_root):
    """The closed form needs an element-wise activation; a softmax-like one is refused unless
    quadrature is asked for."""
    model = build(Case("gpt2", "raw"), hf_root)
    t, mask = _first_layer(model)
    solu = dataclasses.replace(t.mlp, act=lambda x: x * x.softmax(-1), act_name="solu")
    odd = dataclasses.replace(t, mlp=solu)
    with pytest.raises(NotImplementedError, match=r"'solu' is not element-wise"):
        whole_layer.whole_layer_maps(odd, t.pattern, mask, FF)


def test_chunk_that_does_not_fit_names_one_that_does(hf_root, monkeypatch):
    """A chunk size the user chose is kept unless free memory cannot hold it: then the error
    names the size that would fit (the memory policy, asked by the whole-layer kernel)."""
    model = build(Case("gpt2", "raw"), hf_root)
    _, cache = run_with_cache(
        model, tokens(2, 7), names_filter=nm.hook_filter(model, "attnreslnff_n")
    )
    t, _ = _first_layer(model)
    d, hidden = t.W_O.shape[-1], t.mlp.W_in.shape[1]
    per_query = whole_layer.chunk_bytes(t.batch, t.pos, 1, d, hidden)
    fixed = whole_layer.fixed_bytes(t.batch, t.pos, t.v.shape[2], d, hidden)

    def maps(chunk: int):
        options = nm.FFOptions(chunk_size=chunk)
        return nm.mixing_maps(model, cache, "attnreslnff_n", layers=0, options=options)

    monkeypatch.setattr(memory, "free_bytes", lambda device: fixed + 3 * per_query)
    with pytest.raises(MemoryError, match=r"chunk_size=7 needs.*chunk_size=3 would fit"):
        maps(7)
    assert maps(3)["attnreslnff_n"].shape == (1, t.batch, t.pos, t.pos)
    monkeypatch.setattr(memory, "free_bytes", lambda device: fixed // 2)
    with pytest.raises(MemoryError, match="no chunk size fits"):
        maps(7)


# -- the generic path (mixture of experts, any FF module) ---------------------------------------
DENSE = ["gpt2", "llama"] + (["gemma2", "bert"] if TL_MAJOR >= 4 else ["bert"])


@pytest.mark.parametrize("family", DENSE)
def test_generic_path_equals_the_closed_form(family, hf_root):
    """The same FF given as an opaque module (forward-mode derivatives, Gauss–Legendre) gives the
    closed form's maps: the generic machinery is exact where the function is smooth."""
    model = build(Case(family, "raw"), hf_root)
    t, mask = _first_layer(model)
    stages = {"attnreslnff_n": Stage.FF, "layer_n": Stage.OUT}
    closed = whole_layer.whole_layer_maps(t, t.pattern, mask, stages)
    module = FFModule(forward=t.mlp.forward, description="opaque", width=2 * t.mlp.W_in.shape[1])
    generic = whole_layer.whole_layer_maps(
        dataclasses.replace(t, mlp=module), t.pattern, mask, stages, chunk=3
    )
    for name in stages:
        assert_rel_close(generic.maps[name], closed.maps[name], rtol=1e-5, what=name)
        assert generic.completeness[name].max() < 1e-5


MOE = ["mixtral", "olmoe", "qwen2_moe", "gpt_oss"] if TL_MAJOR >= 4 else ["moe"]


@pytest.mark.parametrize("mode", ["raw", "processed"])
@pytest.mark.parametrize("family", MOE)
def test_generic_path_on_mixtures_of_experts(family, mode, hf_root):
    """Mixture-of-experts FF blocks, their router read off the module: the path is cut where the
    top-k choice changes and each jump shared by the score gap, so the parts add up to the block
    output (1e-4 relative, float32) and equal the reference — a midpoint rule with autograd per
    piece between switches found by a fine scan, its jumps measured by finite differences."""
    model = build(Case(family, mode), hf_root)
    toks = tokens(2, 6, seed=4)
    _, cache = run_with_cache(model, toks, names_filter=nm.hook_filter(model, "layer_n"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", nm.CompletenessWarning)
        maps = nm.mixing_maps(model, cache, ("attnreslnff_n", "layer_n"))
    for scope in ("attnreslnff_n", "layer_n"):
        assert float(maps.completeness[scope].max()) < 1e-4, scope
    _, layers = read_layers(model, toks)
    mask = torch.ones(toks.shape, dtype=torch.bool)
    crossed, from_zero = 0, True
    for index, t in enumerate(layers):
        assert t.mlp.router is not None
        ff_in = reference.attention_block(t, "attn_res_ln", mask)
        crossed += len(reference._switch_points(t.mlp, ff_in[1], ff_in[0].sum(2)))
        from_zero &= bool((ff_in[1] == 0).all()) and getattr(t.mlp.router, "bias", None) is None
        ig = reference.whole_layer(t, mask)["ff"][0]
        got = maps["attnreslnff_n"][index]
        assert_rel_close(got, ig.norm(dim=-1).float(), rtol=2e-3, what=f"{family} {index}")
    # the switches are exercised, unless the path is a ray from 0 through a router without bias
    # (its logits only scale along it: the choice never changes)
    assert crossed > 0 or from_zero


def test_a_router_that_is_not_read_leaves_a_residual_and_a_warning(hf_root, monkeypatch):
    """Where a router cannot be read (not linear in the FF input), the generic path integrates
    across the jumps: the residual is reported and warned about, naming the layer and receiver."""
    family = "gpt_oss" if TL_MAJOR >= 4 else "moe"
    model = build(Case(family, "raw"), hf_root, fresh=True)
    toks = tokens(2, 6, seed=4)
    _, cache = run_with_cache(model, toks, names_filter=nm.hook_filter(model, "layer_n"))
    monkeypatch.setattr(ff_module, "read_router", lambda module, d_model: None)
    with pytest.warns(nm.CompletenessWarning, match=r"layer \d, scope 'layer_n'.*batch row \d"):
        maps = nm.mixing_maps(model, cache, "layer_n")
    assert float(maps.completeness["layer_n"].max()) > 1e-4


def test_a_module_that_cannot_be_called_alone_is_refused_naming_the_layer(hf_root, monkeypatch):
    """The generic path calls the model's own FF module on token vectors; one that needs more
    than its input is refused with the layer named, and attention-block scopes still work."""
    family = "mixtral" if TL_MAJOR >= 4 else "moe"
    model = build(Case(family, "raw"), hf_root, fresh=True)
    mlp = model.blocks[1].mlp
    module = getattr(mlp, "original_component", mlp)

    def needs_more(*args, **kwargs):
        raise TypeError("forward() missing 1 required positional argument: 'router_state'")

    _, cache = run_with_cache(model, tokens(), names_filter=nm.hook_filter(model, "layer_n"))
    monkeypatch.setattr(module, "forward", needs_more)  # after the run: only tl_normmix calls it
    expected = r"layer 1: the feed-forward module .*cannot be called on its own.*still work"
    with pytest.raises(nm.UnsupportedModelError, match=expected):
        nm.mixing_maps(model, cache, "layer_n", layers=[1], verify=False)
    assert nm.mixing_maps(model, cache, "attnres_n", layers=[1])["attnres_n"].isfinite().all()
