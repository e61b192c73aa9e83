"""CircuitsVis views: the numbers shown are the maps' (real tokens only), scales, labels, errors."""

from __future__ import annotations

import pytest
import torch
from helpers.handmade_maps import handmade

from tl_normmix.render import views


def _close(shown, expected):
    torch.testing.assert_close(torch.tensor(shown), expected.float(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("batch", [0, 1])
def test_heads_show_every_head_of_the_real_tokens(batch):
    maps = handmade()
    real = maps.mask[batch]
    view = views.heads(maps, "attn_n", 1, batch=batch)
    expected = maps.heads["attn_n"][1, batch][:, real][:, :, real]
    assert view.component == "AttentionHeads"
    _close(view.props["attention"], expected)
    assert view.props["attentionHeadNames"] == ["L1H0", "L1H1", "L1H2"]
    assert view.props["tokens"] == [
        t for t, r in zip(maps.str_tokens[batch], real, strict=True) if r
    ]
    assert view.props["maxValue"] == pytest.approx(float(expected.max()))  # norms: from the data
    assert view.props["maskUpperTri"] is True


def test_weights_keep_the_probability_scale_and_bidirectional_models_show_everything():
    maps = handmade(causal=False)
    view = views.heads(maps, "attn_w", 0)
    assert view.props["maxValue"] == 1.0 and view.props["maskUpperTri"] is False
    assert views.heads(maps, "attn_n", 0, max_value=7.0).props["maxValue"] == 7.0


def test_scope_without_heads_shows_its_layer_map():
    maps = handmade()
    view = views.heads(maps, "attnres_n", 0)
    _close(view.props["attention"], maps["attnres_n"][0, 0][None])
    assert view.props["attentionHeadNames"] == ["L0 attnres_n"]


def test_compare_puts_each_scope_side_by_side_on_its_own_scale():
    maps = handmade()
    row = views.compare(maps, 1)
    assert [v.title for v in row.views] == ["attn_w", "attn_n", "attnres_n"]
    for view in row.views:
        _close(view.props["attention"], maps[view.title][1, 0])
    tops = [v.props["maxValue"] for v in row.views]
    assert tops[0] == 1.0
    assert tops[1] == pytest.approx(float(maps["attn_n"][1, 0].max()))
    assert tops[2] == pytest.approx(float(maps["attnres_n"][1, 0].max()))
    one_head = views.compare(maps, 1, ["attn_w", "attn_n"], head=2)
    _close(one_head.views[1].props["attention"], maps.heads["attn_n"][1, 0, 2])
    with pytest.raises(ValueError, match="no per-head maps"):
        views.compare(maps, 1, head=0)


def test_reads_from_is_a_row_and_writes_to_a_column():
    maps = handmade()
    reads = views.reads_from(maps, "attn_n", 0, -1, batch=1)  # last real token of row 1: 2
    _close(reads.props["values"], maps["attn_n"][0, 1, 2, :3])
    assert reads.component == "ColoredTokens" and "' dog'@2 reads from" in reads.title
    writes = views.writes_to(maps, "attn_n", 0, 0, batch=1)
    _close(writes.props["values"], maps["attn_n"][0, 1, :3, 0])
    assert writes.props["maxValue"] == pytest.approx(float(maps["attn_n"][0, 1, :3, 0].max()))
    with pytest.raises(IndexError, match="not a real token"):
        views.reads_from(maps, "attn_n", 0, 3, batch=1)  # padding
    with pytest.raises(IndexError, match="real tokens"):
        views.writes_to(maps, "attn_n", 0, -9)


def test_value_norms_mean_then_each_head():
    maps = handmade()
    view = views.value_norms(maps, 0, batch=1)
    norms = maps.value_norms[0, 1][:, :3]
    _close(view.props["values"], torch.cat([norms.mean(0, keepdim=True), norms]).T)
    assert view.props["labels"] == ["mean over heads", "head 0", "head 1", "head 2"]


def test_bad_requests_say_what_is_wrong():
    maps = handmade()
    with pytest.raises(KeyError, match="was not computed"):
        views.heads(maps, "layer_n", 0)
    with pytest.raises(IndexError, match="Layer 5 was not computed"):
        views.compare(maps, 5)
    with pytest.raises(IndexError, match="batch 2 out of range"):
        views.heads(maps, "attn_w", 0, batch=2)
    broken = handmade()
    broken.maps["attn_n"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        views.compare(broken, 0)
    no_norms = handmade()
    object.__setattr__(no_norms, "value_norms", None)
    with pytest.raises(ValueError, match="value_norms=True"):
        views.value_norms(no_norms, 0)


def test_numbers_keep_four_significant_digits():
    assert views._numbers(torch.tensor([[1 / 3, 12345.678], [1e-7, 0.0]])) == [
        [0.3333, 12350.0],
        [1e-07, 0.0],
    ]


def test_rollout_view_shows_row_shares_of_each_layers_product():
    import tl_normmix as nm

    maps = handmade()
    real = maps.mask[1]
    view = views.rollout(maps, "attn_n", batch=1)
    rolled = nm.rollout(maps, "attn_n")[:, 1][:, real][:, :, real]
    _close(view.props["attention"], rolled / rolled.sum(-1, keepdim=True))
    assert view.props["attentionHeadNames"] == [f"up to L{layer}" for layer in maps.layers]


def test_methods_view_shows_each_row_as_shares():
    maps = handmade()
    columns = {"a": maps["attn_n"][1], "b": maps["attnres_n"][0]}
    view = views.methods(columns, maps, receiver=-1, batch=0)
    real = maps.mask[0]
    i = int(real.nonzero()[-1])
    expected = torch.stack([c[0, i][real] / c[0, i][real].sum() for c in columns.values()], 1)
    _close(view.props["values"], expected)
    assert view.props["labels"] == ["a", "b"]


def test_routes_view_sums_heads_and_labels_the_residual(hf_root):
    from helpers import tiny_models

    import tl_normmix as nm

    model = tiny_models.build(tiny_models.Case("gpt2", "raw"), hf_root)
    toks = tiny_models.tokens(1, 5)
    _, cache = tiny_models.run_with_cache(model, toks, names_filter=nm.hook_filter(model, "alti"))
    maps = nm.mixing_maps(model, cache, "alti")
    view = views.routes(maps, receiver=-1)
    _close(view.props["values"], maps.heads["alti"][:, 0, :, -1].sum(1).T)
    share = maps.residual_share["alti"][0, 0, -1]
    assert view.props["labels"][0] == f"L0 (residual {float(share):.2f})"
