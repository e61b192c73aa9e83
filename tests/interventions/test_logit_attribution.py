"""``logit_attribution`` and ``router_attribution`` (methods.md#signed-attribution-to-a-target).

* completeness: the parts sum to the model's own readout (1e-5 relative in float32) on every tiny
  family, raw and processed, padded batches included; the model's readout equals the logits of a
  plain forward (softcapped where the model caps them);
* each edge's direct effect equals a float64 reference that pushes the edge vector forward through
  every later norm frozen at the position, the final norm and the unembedding;
* ``tracked("exact")`` equals the reference carried decomposition read out layer by layer, and its
  rows sum with ``untracked`` to the total; ``tracked("alti")`` equals the reference ALTI rollout;
* router attribution completes to the router logits on every mixture of experts.
"""

from __future__ import annotations

import pytest
import torch
from helpers import reference
from helpers.checks import read_layers
from helpers.tiny_models import TL_MAJOR, Case, build, drops_causal_mask, run_with_cache, tokens

import tl_normmix as nm
from tl_normmix.decompose.blocks import FFModule

TARGET, FOIL = 11, 23
#: Mixtures of experts: decompose_model's path is cut at router switches (float32 jumps).
MIXTURES = {"mixtral", "olmoe", "qwen2_moe", "gpt_oss", "moe"}


def _cache(model, toks, mask=None):
    _, cache = run_with_cache(model, toks, mask, names_filter=nm.hook_filter(model, "layer_n"))
    return cache


def _linear_head(case) -> bool:
    """Causal models whose logits are the final norm and the unembedding (ModernBERT's decoder
    has a prediction head with an activation between them)."""
    return case.causal and case.family != "modernbert_decoder"


def _attribute(case, model, toks, mask=None, position=-1):
    cache = _cache(model, toks, mask)
    if _linear_head(case):
        return nm.logit_attribution(
            model, cache, TARGET, foil=FOIL, position=position, attention_mask=mask
        )
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    return nm.logit_attribution(
        model, cache, direction=direction, position=position, attention_mask=mask
    )


def test_parts_add_up_to_the_models_readout(case, model):
    la = _attribute(case, model, tokens(2, 6))
    assert la.residual.max() < 1e-5, la.residual
    assert torch.allclose(la.total, la.actual, rtol=1e-4, atol=1e-4)
    assert la.heads.shape[:2] == (model.cfg.n_layers, 2) and la.layers.shape[-1] == 6
    assert la.heads.abs().max() > 0  # the edges carry part of the readout
    if not _linear_head(case):
        return
    with torch.no_grad():  # the readout is the model's own logit (difference)
        logits = model(tokens(2, 6))[:, -1].float()
    one = nm.logit_attribution(model, _cache(model, tokens(2, 6)), TARGET)
    cap = one.softcap
    capped = one.actual if cap is None else cap * torch.tanh(one.actual / cap)
    assert torch.allclose(capped, logits[:, TARGET], rtol=1e-4, atol=1e-4)
    if cap is None:  # a softcapped difference is not the difference of softcapped logits
        assert torch.allclose(la.actual, logits[:, TARGET] - logits[:, FOIL], rtol=1e-4, atol=1e-4)


def test_padded_rows_read_their_own_last_token(case, model):
    if case.mode != "raw" or drops_causal_mask(model):
        return
    toks = tokens(2, 6, seed=4)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    la = _attribute(case, model, toks, mask, position=mask.sum(1) - 1)
    assert la.residual.max() < 1e-5, la.residual
    assert (la.heads[:, 1, :, 4:] == 0).all()
    alone = _attribute(case, model, toks[1:, :4], position=-1)
    assert torch.allclose(la.total[1], alone.total[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="padding in batch row"):
        _attribute(case, model, toks, mask, position=-1)


def _pushed_forward(layers, la, model, case):
    """Each edge vector ``α^h_pj f^h_j`` pushed forward in float64 through every later chain
    frozen at ``p`` (``norm.linear``), the final norm and the readout ``u``."""
    adapter = nm.adapt(model)
    rows = torch.arange(la.position.shape[0])
    pos = la.position

    def frozen(t, names, z):
        for name in names:
            norm = reference._double(t.norms[name])
            z = norm.linear(z, t.scale(name).double()[rows, pos][:, None, None, :])
        return z

    final_stream = layers[-1]["resid_post"].double()[rows, pos]
    out = []
    for index, t in enumerate(layers):
        alpha = t.pattern.double()[rows, :, pos]  # [batch, head, source]
        alpha = alpha.masked_fill(~la.mask[:, None, :], 0.0)
        f = torch.einsum("bjhd,hdm->bhjm", t.v.double(), t.W_O.double())
        z = frozen(t, t.layout.attn_out, alpha[..., None] * f)
        if not t.layout.parallel:
            z = frozen(t, t.layout.mid, z)
        z = frozen(t, t.layout.post, z)
        for later in layers[index + 1 :]:
            if not later.layout.parallel:
                z = frozen(later, later.layout.mid, z)
            z = frozen(later, later.layout.post, z)
        out.append(z)
    # the final readout: the final norm (causal models) frozen at the real stream, then u
    final = adapter.final_norm() if adapter.spec.causal else None
    if final is not None:
        final = reference._double(final)
        scale = final.scale_of(final_stream)
        out = [final.linear(z, scale[:, None, None, :]) for z in out]
    if _linear_head(case):
        W_U = model.W_U.detach().double()
        u = (W_U[:, TARGET] - W_U[:, FOIL]).expand(len(rows), -1) * _slope(model)
        projection = getattr(model, "project_out", None)  # OPT-350m: a linear map before W_U
        if projection is not None:
            u = u @ getattr(projection, "original_component", projection).weight.detach().double()
    else:
        u = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3)).double()
        u = u.expand(len(rows), -1)
    return torch.stack([(z * u[:, None, None, :]).sum(-1) for z in out])


def _slope(model) -> float:
    """The model's own scaling of its logits (Granite's ``logits_scaling``, Cohere's
    ``logit_scale``; folded into ``W_U`` by weight processing): the slope at zero of the output
    transform a TransformerLens bridge declares."""
    transform = getattr(getattr(model, "adapter", None), "apply_output_logits_transform", None)
    if not callable(transform):
        return 1.0
    small = torch.tensor([1e-4], dtype=torch.float64)
    return float(transform(small) / small)


def test_edges_equal_the_pushed_forward_reference(case, model):
    toks = tokens(2, 5, seed=1)
    la = _attribute(case, model, toks)
    _, layers = read_layers(model, toks)
    expected = _pushed_forward(layers, la, model, case)
    scale = expected.abs().max()
    error = (la.heads.double() - expected).abs().max()
    assert error <= 1e-4 * scale, f"max error {error:.3g} vs scale {scale:.3g}"


def test_tracked_exact_equals_the_reference_carried_parts(case, model):
    toks = tokens(1, 4, seed=2)
    la = _attribute(case, model, toks)
    if case.family == "deepseek_v3":  # multi-head latent attention: decompose_model refuses
        with pytest.raises(nm.UnsupportedModelError):
            la.tracked("exact")
        return
    tracked = la.tracked("exact")
    complete = tracked.sum((0, 2)) + la.untracked("exact")
    scale = float(la.heads.abs().sum() + la.total.abs().sum())
    tolerance = 1e-4 if case.family in MIXTURES else 1e-5
    assert (complete - la.total).abs().max() <= tolerance * scale
    adapter, layers = read_layers(model, toks)
    real = torch.ones(toks.shape, dtype=torch.bool)
    x = layers[0]["resid_pre"].double()
    n = x.shape[1]
    stage = (torch.eye(n, dtype=torch.float64)[None, :, :, None] * x[:, :, None], 0 * x)
    previous = None
    p = int(la.position[0])
    act = getattr(layers[0].mlp, "act_name", "").lower()
    rtol = 3e-3 if "relu" in act and "squared" not in act else 1e-4  # midpoint rule at the kink
    for t in layers:
        W_V, b_V = adapter.value_weights(t.layer)
        stage = reference.carried_block(t, W_V, b_V, stage, real)
        now = stage[0][0, p] @ la.readouts[t.layer, 0].double()  # [source]
        want = now if previous is None else now - previous
        previous = now
        error = float((tracked[t.layer, 0].double() - want).abs().max())
        assert error <= rtol * scale, f"layer {t.layer}: {error:.3g} vs {scale:.3g}"


def test_tracked_alti_is_the_layer_row_times_the_rollout_below(case, model):
    toks = tokens(1, 5, seed=3)
    la = _attribute(case, model, toks)
    tracked = la.tracked("alti")
    torch.testing.assert_close(tracked[0], la.layers[0])
    _, layers = read_layers(model, toks)
    real = torch.ones(toks.shape, dtype=torch.bool)
    chained = None
    for index, t in enumerate(layers[:-1]):
        step = reference.alti(t, real)
        chained = step if chained is None else step @ chained
        want = la.layers[index + 1].double()[:, None, :] @ chained
        torch.testing.assert_close(tracked[index + 1].double(), want[:, 0], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(la.untracked("alti"), la.total - tracked.sum((0, 2)))


def test_strings_directions_and_refusals(hf_root):
    model = build(Case("gpt2", "raw"), hf_root)
    toks = tokens(2, 5)
    cache = _cache(model, toks)
    by_id = nm.logit_attribution(model, cache, torch.tensor([TARGET, FOIL]))
    assert by_id.target.tolist() == [TARGET, FOIL]
    column = model.W_U[:, TARGET].detach()
    la = nm.logit_attribution(model, cache, direction=column)
    one = nm.logit_attribution(model, cache, TARGET)
    b_U = model.b_U[TARGET].detach() if getattr(model, "b_U", None) is not None else 0.0
    torch.testing.assert_close(la.total + b_U, one.total, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="either a target"):
        nm.logit_attribution(model, cache, TARGET, direction=column)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        nm.logit_attribution(model, cache, 10**9)
    with pytest.raises(IndexError, match="outside"):
        nm.logit_attribution(model, cache, TARGET, position=9)
    with pytest.raises(ValueError, match="tracked"):
        la.tracked("rollout")  # type: ignore[arg-type]
    _, partial = run_with_cache(model, toks, names_filter=nm.hook_filter(model, "attn_w"))
    with pytest.raises(nm.MissingHookError, match="hook_filter\\(model, 'layer_n'\\)"):
        nm.logit_attribution(model, partial, TARGET)
    ran = nm.logit_attribution(model, target=TARGET, tokens=toks)
    torch.testing.assert_close(ran.total, one.total)
    assert "LogitAttribution(" in repr(one)


@pytest.mark.parametrize("family", ["bert", "modernbert_decoder"])
def test_nonlinear_heads_refuse_a_target(hf_root, family):
    if TL_MAJOR < 4 and family != "bert":
        return
    model = build(Case(family, "raw"), hf_root)
    with pytest.raises(nm.UnsupportedModelError, match="direction="):
        nm.logit_attribution(model, _cache(model, tokens(1, 4)), TARGET)


def test_edges_top_and_as_maps_rank_the_direct_effects(hf_root):
    model = build(Case("llama", "raw"), hf_root)
    la = nm.logit_attribution(model, _cache(model, tokens(1, 6)), TARGET, foil=FOIL)
    maps = la.as_maps(tracked="alti")
    assert set(maps.maps) == {"logit", "logit_alti"}
    row = maps["logit"][:, 0, -1]
    torch.testing.assert_close(row, la.layers[:, 0].abs())
    assert maps["logit"][:, 0, :-1].abs().sum() == 0
    top = nm.edges.top(la, k=3)
    best = la.layers[:, 0].abs().flatten().topk(3).indices
    want = [(int(i) // 6, 5, int(i) % 6) for i in best]
    assert [(e.layer, e.receiver, e.source) for e in top] == want


def _router_layer(model) -> int | None:
    adapter = nm.adapt(model)
    for layer in range(adapter.spec.n_layers):
        if adapter.structure.mlp_kind_of(layer) is None:
            continue
        ff = adapter.feed_forward(layer)
        if isinstance(ff, FFModule) and ff.router is not None:
            return layer
    return None


def test_router_logits_split_over_sources(case, model):
    layer = _router_layer(model)
    if layer is None:
        if case.family in ("gpt2", "attn_only"):
            with pytest.raises(nm.UnsupportedModelError, match="no router"):
                nm.router_attribution(model, _cache(model, tokens(1, 3)), 0)
        return
    toks = tokens(2, 6, seed=5)
    ra = nm.router_attribution(model, _cache(model, toks), layer)
    assert ra.residual.max() < 1e-5, ra.residual
    assert ra.sources.shape == (2, 6, ra.logits.shape[-1], 6)
    assert (ra.chosen.sum(-1) == ra.top_k).all()
    if nm.adapt(model).spec.causal:  # no source after its receiver
        future = torch.ones(6, 6, dtype=torch.bool).triu(1)
        assert (ra.sources.transpose(2, 3)[:, future] == 0).all()
    assert "RouterAttribution(" in repr(ra)


def test_signed_views_plots_and_the_report_section(hf_root):
    from tl_normmix.reports.report import build_report

    model = build(Case("gpt2", "raw"), hf_root)
    toks = tokens(1, 6)
    la = nm.logit_attribution(model, _cache(model, toks), TARGET, foil=FOIL, tokens=toks)
    view = nm.views.logit_tokens(la)
    values = torch.tensor(view.props["values"])
    torch.testing.assert_close(values, la.layers[:, 0].sum(0), rtol=1e-3, atol=1e-4)
    assert view.props["minValue"] == -view.props["maxValue"]
    assert view.props["maxValue"] == pytest.approx(float(values.abs().max()), rel=1e-3)
    heads = nm.views.logit_layers(la, layer=1)
    assert heads.props["labels"] == [f"L1H{h}" for h in range(model.cfg.n_heads)]
    tracked = nm.views.logit_layers(la, tracked="exact")
    assert torch.tensor(tracked.props["values"]).shape == (6, model.cfg.n_layers)
    fig = nm.plots.logit_heads(la, 0)
    assert fig.axes[0].images[0].get_clim() == pytest.approx(
        (-float(la.heads[0, 0].abs().max()), float(la.heads[0, 0].abs().max())), rel=1e-5
    )
    html = build_report(model, toks, scopes=["attn_w"], methods=False, target=TARGET, foil=FOIL)
    assert "Attribution to the target" in html and "logit difference" in html
    assert f"{float(la.actual[0]):.4g}" in html
    with pytest.raises(ValueError, match="foil needs a target"):
        build_report(model, toks, scopes=["attn_w"], methods=False, foil=FOIL)


def test_agreement_scores_an_attribution_against_knock_outs(hf_root):
    model = build(Case("llama", "raw"), hf_root)
    toks = tokens(1, 6)
    la = nm.logit_attribution(model, _cache(model, toks), TARGET, foil=FOIL)

    def metric(logits):
        return logits[:, -1, TARGET] - logits[:, -1, FOIL]

    ko = nm.knock_out(model, toks, nm.edges(heads=None), metric, progress=False)
    table = nm.agreement(la, ko).table
    overall = table[table.layer == "all"].set_index("scope")
    assert set(overall.index) == {"logit", "logit_alti"}
    assert (overall["edges"] == len(ko.edges)).all()
    assert overall["spearman"].between(-1, 1).all()
