"""Plots draw the statistics the analyses compute (checked on the lines' data)."""

from __future__ import annotations

import base64

import matplotlib
import pytest
import torch
from helpers.handmade_maps import handmade

from tl_normmix.analysis.summary import mixing_ratio_stats, sink_share
from tl_normmix.analysis.whole_layer import contextualization_change
from tl_normmix.render import plots

matplotlib.use("Agg")


def _lines(fig):
    (ax,) = fig.axes
    return {line.get_label(): line for line in ax.get_lines()}


def test_mixing_ratios_one_line_per_scope():
    maps = handmade()
    lines = _lines(plots.mixing_ratios(maps))
    assert list(lines) == list(maps.scopes)
    for scope, line in lines.items():
        assert list(line.get_xdata()) == [0, 1]
        torch.testing.assert_close(
            torch.tensor(line.get_ydata(), dtype=torch.float32),
            mixing_ratio_stats(maps, scope)[:, 0],
        )


def test_sink_share_by_weight_and_by_norm():
    maps = handmade()
    fig = plots.sink_shares(maps)
    lines = list(_lines(fig).values())
    for line, scope in zip(lines, ("attn_w", "attn_n"), strict=True):
        torch.testing.assert_close(
            torch.tensor(line.get_ydata(), dtype=torch.float32), sink_share(maps, scope)
        )
    assert "'<s>'@0" in fig.axes[0].get_title()


def test_contextualization_changes_between_consecutive_scopes():
    maps = handmade()
    lines = _lines(plots.contextualization_changes(maps))
    assert list(lines) == ["attn_w → attn_n", "attn_n → attnres_n"]
    expected = torch.nanmean(contextualization_change(maps, "attn_n", "attnres_n"), dim=1)
    torch.testing.assert_close(
        torch.tensor(lines["attn_n → attnres_n"].get_ydata(), dtype=expected.dtype), expected
    )


def test_draws_on_given_axes_and_embeds_as_png():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    assert plots.mixing_ratios(handmade(), ["attn_w"], ax=ax) is fig
    block = plots.figure_block(fig, title="ratios")
    data = block.html.split("base64,")[1].split('"')[0]
    assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"


def test_sink_share_needs_both_scopes():
    maps = handmade()
    del maps.maps["attn_n"]
    with pytest.raises(KeyError, match="attn_n"):
        plots.sink_shares(maps)
