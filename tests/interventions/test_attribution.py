"""First-order attribution, agreement, faithfulness curves and map differences.

* ``edge_attribution`` equals TransformerLens's attention attribution −pattern · ∂m/∂pattern
  (autograd) cell by cell where the pattern is live, and the first-order term of exact
  knock-outs everywhere (scaled edits: effect/ε → attribution as ε → 0);
* ``agreement`` is the Spearman correlation it says, on hand-made maps and effects;
* a faithfulness curve keeps nothing at 0 and everything at 1 (recovered 0 and 1);
* ``diff`` of a run with itself is zero, and of two runs is their difference.
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import Case, build, run_with_cache, tokens
from test_knockout import N, _live, metric

import tl_normmix as nm
from tl_normmix.analysis.ranks import spearman
from tl_normmix.models.editing import editor


def test_attribution_equals_pattern_times_its_gradient(model):
    if not _live(model, "blocks.0.attn.hook_pattern"):
        pytest.skip("the pattern is not live here: its gradient does not reach the metric")
    toks = tokens(2, N)
    att = nm.edge_attribution(model, toks, metric)
    ed = editor(model)
    leaves, patterns = {}, {}

    def leaf(layer):
        def add(t, hook):
            zero = torch.zeros_like(t, requires_grad=True)
            leaves[layer], patterns[layer] = zero, t.detach()
            return t + zero

        return add

    with torch.enable_grad():
        out = ed.run(toks, [(ed.pattern(layer), leaf(layer)) for layer in range(2)])
        grads = torch.autograd.grad(metric(out).sum(), [leaves[0], leaves[1]])
    for layer, grad in enumerate(grads):
        expected = -(patterns[layer] * grad).float()
        torch.testing.assert_close(att.heads[layer], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(att.maps, att.heads.sum(2))


def test_attribution_is_the_first_order_term_of_the_knock_out(model):
    """A removal is a finite edit; its first-order estimate must track it: over the per-head
    edges of the last token, Spearman ≥ 0.6 (measured ≥ 0.8 on every tiny family)."""
    toks = tokens(2, N)
    att = nm.edge_attribution(model, toks, metric)
    ko = nm.knock_out(model, toks, nm.edges(heads="each"), metric)
    first = torch.stack(
        [att.heads[e.layer, :, e.head, N - 1, e.source] for e in ko.edges]
    )  # [edge, batch]
    valid = ko.effect.isfinite()
    assert spearman(first[valid].double(), ko.effect[valid].double()) > 0.6


def test_agreement_reports_the_spearman_it_claims(hf_root):
    model = build(Case("gpt2", "raw"), hf_root)
    toks = tokens(2, N)
    scopes = ("attn_w", "attn_n")
    _, cache = run_with_cache(model, toks, names_filter=nm.hook_filter(model, scopes))
    maps = nm.mixing_maps(model, cache, scopes)
    ko = nm.knock_out(model, toks, nm.edges(heads=None), metric)
    report = nm.agreement(maps, ko, k=3)
    table = report.table
    for scope in scopes:
        scores = torch.stack([maps[scope][e.layer, :, N - 1, e.source] for e in ko.edges])
        expected = spearman(scores.flatten().double(), ko.effect.abs().flatten().double())
        overall = table[(table.scope == scope) & (table.layer == "all")]
        assert abs(float(overall.spearman.iloc[0]) - expected) < 1e-9
        assert int(overall.edges.iloc[0]) == ko.effect.numel()
        assert set(table[table.scope == scope].layer) == {"all", 0, 1}
        assert 0.0 <= float(overall.recall_at_k.iloc[0]) <= 1.0
    assert nm.plots.agreement(report) is not None
    with pytest.raises(KeyError, match="not in the maps"):
        nm.agreement(maps, ko, scopes=["layer_n"])


def test_faithfulness_curve_ends(model):
    toks = tokens(2, N)
    att = nm.edge_attribution(model, toks, metric)
    curve = nm.faithfulness_curve(model, toks, metric, att.heads.abs(), fractions=(0.0, 0.3, 1.0))
    assert curve.value.shape == (3, 2)
    torch.testing.assert_close(curve.value[0], curve.ablated_all)
    torch.testing.assert_close(curve.value[-1], curve.clean, atol=1e-4, rtol=1e-4)
    gap = (curve.clean - curve.ablated_all).abs() > 1e-3
    torch.testing.assert_close(
        curve.recovered[-1][gap], torch.ones(int(gap.sum())), atol=1e-3, rtol=1e-3
    )
    assert nm.plots.faithfulness([("attribution", curve)]) is not None


def test_diff_of_two_runs(hf_root):
    model = build(Case("gpt2", "raw"), hf_root)
    scopes = ("attn_w", "attn_n")
    a = nm.mixing_maps(
        model,
        run_with_cache(model, tokens(2, N, seed=1), names_filter=nm.hook_filter(model, scopes))[1],
        scopes,
    )
    b = nm.mixing_maps(
        model,
        run_with_cache(model, tokens(2, N, seed=2), names_filter=nm.hook_filter(model, scopes))[1],
        scopes,
    )
    same = nm.diff(a, a)
    assert all((same[s] == 0).all() for s in scopes) and (same.heads["attn_n"] == 0).all()
    d = nm.diff(a, b)
    torch.testing.assert_close(d["attn_n"], b["attn_n"] - a["attn_n"])
    torch.testing.assert_close(
        d.mixing_ratio("attn_w"), b.mixing_ratio("attn_w") - a.mixing_ratio("attn_w")
    )
    other = nm.mixing_maps(
        model,
        run_with_cache(model, tokens(2, N + 1), names_filter=nm.hook_filter(model, scopes))[1],
        scopes,
    )
    with pytest.raises(ValueError, match="same length"):
        nm.diff(a, other)


def test_hidden_state_metric_for_an_encoder(hf_root):
    """Encoders without a trained head: the metric reads the last block's output."""
    model = build(Case("bert", "raw"), hf_root)
    toks = tokens(2, N)
    ed = editor(model)
    with torch.no_grad():
        clean = ed.run(toks, hidden=True)

    @nm.on_hidden_states
    def similarity(hidden):
        return torch.nn.functional.cosine_similarity(hidden.mean(1), clean.mean(1), dim=-1)

    ko = nm.knock_out(model, toks, nm.edges(receivers=[0], sources=[1, 2]), similarity)
    torch.testing.assert_close(ko.clean, torch.ones(2), atol=1e-5, rtol=1e-5)
    assert (ko.effect <= 1e-6).all() and (ko.effect < 0).any()
    att = nm.edge_attribution(model, toks, similarity)
    assert att.maps.shape == (2, 2, N, N)
