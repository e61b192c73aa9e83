"""Contextualization change and FF amplification (methods.md#the-feed-forward-block) on hand-built
and tiny-model maps.

Invariants:
  * ``spearman`` equals the Pearson correlation of tie-averaged ranks; with scipy installed it
    equals ``scipy.stats.spearmanr`` on random data with ties;
  * contextualization change is 0 for a map against any increasing transform of itself and 2
    against its reversal, over valid cells only (future cells of causal models are ignored);
  * the planted pair whose share grows most through the FF comes first, with its token strings;
  * on every tiny model the analyses of real whole-layer maps are finite and in range.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers.tiny_models import run_with_cache, tokens

import tl_normmix as nm
from tl_normmix.analysis.ranks import spearman, valid_cells
from tl_normmix.decompose.blocks import Stage
from tl_normmix.maps import MixingMaps, UnsupportedScopeError


def _maps(maps: dict[str, torch.Tensor], mask: torch.Tensor, causal: bool, str_tokens=None):
    return MixingMaps(
        layers=tuple(range(next(iter(maps.values())).shape[0])),
        maps=maps,
        heads={},
        ratios={},
        mask=mask,
        convention="raw",
        model_name="hand-built",
        str_tokens=str_tokens,
        causal=causal,
    )


def test_spearman_is_pearson_of_average_ranks():
    a = torch.tensor([3.0, 1.0, 1.0, 2.0, 5.0])
    b = torch.tensor([0.5, 0.1, 0.3, 0.2, 0.9])
    ranks_a = torch.tensor([4.0, 1.5, 1.5, 3.0, 5.0])  # ties share the mean rank
    ranks_b = torch.tensor([4.0, 1.0, 3.0, 2.0, 5.0])
    expected = torch.corrcoef(torch.stack([ranks_a, ranks_b]).double())[0, 1].item()
    assert spearman(a, b) == pytest.approx(expected, abs=1e-12)
    scipy_stats = pytest.importorskip("scipy.stats")  # installed in the TL 4.x job
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (50,), generator=gen).double()
    y = x + torch.randn(50, generator=gen, dtype=torch.float64)
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_change_over_valid_cells(causal):
    gen = torch.Generator().manual_seed(1)
    base = torch.rand(2, 1, 5, 5, generator=gen)
    mask = torch.tensor([[True] * 5])
    maps = {"a": base, "b": base.exp() * 3.0, "c": -base}
    if causal:  # scramble the future cells: they must not matter
        maps["b"] = maps["b"] + torch.ones(5, 5).triu(1) * torch.rand(5, 5, generator=gen) * 100
    result = _maps(maps, mask, causal)
    cells = valid_cells(result.mask, result.causal)
    assert int(cells.sum()) == (15 if causal else 25)
    assert torch.allclose(nm.contextualization_change(result, "a", "b"), torch.zeros(2, 1).double())
    change = nm.contextualization_change(result, "a", "c")  # a perfect reversal on valid cells
    assert torch.allclose(change, torch.full((2, 1), 2.0).double())


def test_planted_pair_is_the_most_amplified():
    n = 4
    before = torch.full((1, 1, n, n), 1.0)
    after = before.clone()
    after[0, 0, 3, 1] = 5.0  # token 3 reads much more from token 1 after the FF
    after[0, 0, 2, 0] = 2.0
    mask = torch.tensor([[True] * n])
    words = [["<s>", "un", "believ", "able"]]
    result = _maps({"attnresln_n": before, "attnreslnff_n": after}, mask, True, words)
    pairs = nm.ff_amplified_pairs(result, k=2)[0]
    assert (pairs[0].query, pairs[0].key) == (3, 1)
    assert (pairs[0].query_token, pairs[0].key_token) == ("able", "un")
    assert pairs[0].share_before == pytest.approx(0.25)
    assert pairs[0].share_after == pytest.approx(5.0 / 8.0)
    assert (pairs[1].query, pairs[1].key) == (2, 0)
    assert pairs[0].gain > pairs[1].gain > 0
    without = nm.ff_amplified_pairs(result, k=2, exclude_keys=(1,))[0]
    assert (without[0].query, without[0].key) == (2, 0)
    assert all(p.key != 1 for p in without)


def test_analyses_on_real_whole_layer_maps(model):
    layout = nm.adapt(model).layout
    if layout.parallel or not layout.has_mlp:
        with pytest.raises(UnsupportedScopeError):
            nm.hook_filter(model, "attnreslnff_n")
        return
    # the FF input map: attnresln_n, or attnres_n where no norm reads attention + residual
    first = "attnres_n" if layout.unsupported(Stage.ATTN_RES_LN) else "attnresln_n"
    scopes = (first, "attnreslnff_n", "attnreslnffres_n")
    toks = tokens()
    _, cache = run_with_cache(model, toks, names_filter=nm.hook_filter(model, scopes))
    maps = nm.mixing_maps(model, cache, scopes, tokens=toks)
    for before, after in itertools.pairwise(scopes):
        change = nm.contextualization_change(maps, before, after)
        assert change.shape == (len(maps.layers), toks.shape[0])
        assert ((change >= 0) & (change <= 2)).all()
    pairs = nm.ff_amplified_pairs(maps, k=3, before=first)
    assert set(pairs) == set(maps.layers)
    for layer_pairs in pairs.values():
        assert len(layer_pairs) == 3
        assert all(p.query != p.key for p in layer_pairs)
        if maps.causal:
            assert all(p.key < p.query for p in layer_pairs)
        gains = [p.gain for p in layer_pairs]
        assert gains == sorted(gains, reverse=True)


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama", "gemma2"])
def test_ff_outlier_dimensions(family, hf_root):
    """The FF vectors of ``ff_parts`` are the reference's Riemann IG; shares sum to 1 and are
    sorted; leaving every dimension out but the top ones keeps the change computable; the next
    norm is the one that reads the FF output first."""
    from helpers import reference
    from helpers.checks import assert_rel_close, read_layers
    from helpers.tiny_models import Case, build

    model = build(Case(family, "raw"), hf_root)
    toks = tokens(2, 6)
    _, cache = run_with_cache(model, toks, names_filter=nm.hook_filter(model, "layer_n"))
    _, layers = read_layers(model, toks)
    mask = torch.ones(toks.shape, dtype=torch.bool)
    for t in layers:
        parts = nm.analysis.ff_parts(model, cache, t.layer)
        expected = reference.whole_layer(t, mask)["ff"][0]
        assert_rel_close(parts.ig, expected, rtol=1e-4, what=f"IG layer {t.layer}")
        out = nm.analysis.ff_outlier_dimensions(parts, t.layer, top=3)
        assert abs(out.table.share.sum() - 1) < 1e-9
        assert out.table.share.is_monotonic_decreasing
        assert out.dims == list(out.table.index[:3])
        assert 0 <= out.change <= 2 and 0 <= out.change_without <= 2
        layout = nm.adapt(model).layout
        expected_norm = {
            "sandwich": f"blocks.{t.layer}.ln2_post",
            "post_ln": f"blocks.{t.layer}.ln2",
        }.get(layout.name, f"blocks.{t.layer + 1}.ln1" if t.layer == 0 else "ln_final")
        assert out.next_norm == expected_norm
    maps = nm.mixing_maps(model, cache, "attn_w")
    with pytest.raises(TypeError, match="ff_parts"):
        nm.analysis.ff_outlier_dimensions(maps, 0)
    with pytest.raises(ValueError, match="of layer 1, not 0"):
        nm.analysis.ff_outlier_dimensions(parts, 1 - parts.layer)
