"""Matplotlib plots of a ``MixingMaps`` where a plot reads better than a table (a consumer).

Each function draws on ``ax`` if given, else on a new ``matplotlib.figure.Figure`` (no pyplot
state; in a notebook with ``%matplotlib inline`` or pyplot imported, a returned figure shows
itself), and returns the figure. ``figure_block`` turns a
figure into a page block (an embedded PNG, no external file).

* ``mixing_ratios``: the mean context-mixing ratio per layer, one line per scope
(methods.md#residual-and-layer-norm);
* ``sink_shares``: the share the sink token receives by attention weight (``attn_w``) and by
  norm (``attn_n``) per layer (Kobayashi et al. 2020);
* ``contextualization_changes``: ``1 − Spearman ρ`` between consecutive scopes per layer
  (methods.md#the-feed-forward-block; Kobayashi et al. 2024);
* ``agreement``: per layer and scope, how well a map ranks exact intervention effects
  (``nm.agreement``; methods.md#interventions-on-edges);
* ``faithfulness``: the share of the clean−ablated gap recovered against the fraction of edges
  kept, one line per scoring (``nm.faithfulness_curve``).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import torch

from tl_normmix.analysis.summary import mixing_ratio_stats, sink_share
from tl_normmix.analysis.whole_layer import contextualization_change
from tl_normmix.maps import MixingMaps
from tl_normmix.render.page import Block

__all__ = [
    "agreement",
    "contextualization_changes",
    "faithfulness",
    "figure_block",
    "head_grid",
    "layer_profiles",
    "logit_heads",
    "logit_layers",
    "mixing_ratios",
    "reach",
    "sink_shares",
]


def mixing_ratios(maps: MixingMaps, scopes: Sequence[str] | None = None, *, ax: Any = None) -> Any:
    """Mean mixing ratio over real tokens per layer, for each scope (default: all computed)."""
    fig, ax = _axes(ax)
    for scope in scopes if scopes is not None else maps.scopes:
        ax.plot(maps.layers, mixing_ratio_stats(maps, scope)[:, 0].tolist(), "o-", label=scope)
    _finish(ax, "mixing ratio (mean over tokens)", "context-mixing ratio per layer")
    ax.set_ylim(bottom=0)
    return fig


def sink_shares(maps: MixingMaps, *, sink: int = 0, ax: Any = None) -> Any:
    """Share of token ``sink`` (a position; default the first token) by weight and by norm."""
    fig, ax = _axes(ax)
    label = str(sink)
    if maps.str_tokens is not None:
        label = f"{maps.str_tokens[0][sink]!r}@{sink}"
    for scope, name in (("attn_w", "by weight (attn_w)"), ("attn_n", "by norm (attn_n)")):
        ax.plot(maps.layers, sink_share(maps, scope, sink).tolist(), "o-", label=name)
    _finish(ax, f"share received by {label}", f"sink share of {label}: weight vs norm")
    ax.set_ylim(0, 1)
    return fig


def reach(maps: MixingMaps, scopes: Sequence[str] | None = None, *, ax: Any = None) -> Any:
    """How far tokens read, per layer, from ``run_mixing_maps(..., keep="stats")``: the mean over
    real receivers of the first token's share (solid) and of the previous ``window`` tokens'
    share (dashed), one colour per scope."""
    fig, ax = _axes(ax)
    for scope in scopes if scopes is not None else tuple(maps.stats):
        stats = maps.stats[scope]
        sink = stats.sink_share.nanmean(dim=(1, 2)).tolist()
        window = stats.window_share.nanmean(dim=(1, 2)).tolist()
        (line,) = ax.plot(maps.layers, sink, "o-", label=f"{scope}: first token")
        ax.plot(
            maps.layers,
            window,
            "s--",
            color=line.get_color(),
            label=f"{scope}: previous {stats.window} tokens",
        )
    _finish(ax, "share of the row (mean over tokens)", "where tokens read from, per layer")
    ax.set_ylim(0, 1)
    return fig


def contextualization_changes(
    maps: MixingMaps, steps: Sequence[tuple[str, str]] | None = None, *, ax: Any = None
) -> Any:
    """``1 − ρ`` per layer (mean over batch rows) for each ``(before, after)`` step (default:
    consecutive computed scopes)."""
    fig, ax = _axes(ax)
    if steps is None:
        steps = list(zip(maps.scopes, maps.scopes[1:], strict=False))
    for before, after in steps:
        change = contextualization_change(maps, before, after)  # [layer, batch]
        ax.plot(
            maps.layers, torch.nanmean(change, dim=1).tolist(), "o-", label=f"{before} → {after}"
        )
    _finish(ax, "1 − Spearman ρ", "contextualization change per layer")
    ax.set_ylim(bottom=0)
    return fig


def agreement(report: Any, *, ax: Any = None) -> Any:
    """Spearman ρ between each scope and ``|effect|`` per layer (``nm.agreement``'s table)."""
    fig, ax = _axes(ax)
    table = report.table
    per_layer = table[table["layer"] != "all"]
    for scope in dict.fromkeys(per_layer["scope"]):
        rows = per_layer[per_layer["scope"] == scope]
        overall = table[(table["scope"] == scope) & (table["layer"] == "all")]["spearman"]
        label = f"{scope} (all: {float(overall.iloc[0]):.2f})" if len(overall) else scope
        ax.plot(rows["layer"].astype(int).tolist(), rows["spearman"].tolist(), "o-", label=label)
    _finish(ax, "Spearman ρ with |effect|", f"agreement with exact '{report.mode}' effects")
    ax.set_ylim(-1, 1)
    return fig


def faithfulness(curves: Sequence[tuple[str, Any]], *, ax: Any = None) -> Any:
    """Mean recovered share (over batch rows) against the fraction of edges kept."""
    fig, ax = _axes(ax)
    for label, curve in curves:
        ax.plot(curve.fractions, torch.nanmean(curve.recovered, dim=1).tolist(), "o-", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of edges kept")
    ax.set_ylabel("share of clean − ablated recovered")
    ax.set_title("faithfulness of the edges each scoring keeps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def figure_block(fig: Any, *, title: str = "", caption: str = "", dpi: int = 110) -> Block:
    """The figure as an embedded PNG (``data:`` URI) page block."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    alt = html.escape(title or "plot", quote=True)
    image = f'<img class="tlnm-plot" alt="{alt}" src="data:image/png;base64,{data}">'
    return Block(image, title=title, caption=caption, classes=("tlnm-plot-block",))


def _axes(ax: Any) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.6), layout="constrained")
    return fig, fig.add_subplot()


def _finish(ax: Any, ylabel: str, title: str) -> None:
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def head_grid(
    table: Any,
    value: str,
    title: str,
    *,
    ax: Any = None,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Any:
    """A layer × head heat map of ``table[value]`` (a DataFrame with ``layer``, ``head``);
    pass ``vmin``/``vmax`` to share one colour scale between grids shown side by side."""
    fig, ax = _axes(ax)
    per_head = table[table["head"] >= 0]
    grid = per_head.pivot_table(index="layer", columns="head", values=value, aggfunc="first")
    image = ax.imshow(
        grid.to_numpy(), aspect="auto", cmap=cmap, origin="lower", vmin=vmin, vmax=vmax
    )
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize="medium")
    fig.colorbar(image, ax=ax)
    return fig


def layer_profiles(
    profiles: Sequence[tuple[str, Any]], ylabel: str, title: str, *, ax: Any = None
) -> Any:
    """One line per ``(label, DataFrame with layer, value)`` against the layer."""
    fig, ax = _axes(ax)
    for label, frame in profiles:
        frame = frame.sort_values("layer")
        ax.plot(frame["layer"], frame["value"], "o-", label=label)
    _finish(ax, ylabel, title)
    return fig


def logit_heads(la: Any, layer: int, *, batch: int = 0, ax: Any = None) -> Any:
    """A head × source heat map of a ``LogitAttribution``'s direct effects at ``layer``
    (diverging colours, symmetric about zero)."""
    real = la.mask[batch].nonzero().flatten().cpu()
    data = la.heads[layer, batch][:, real].float().cpu().numpy()
    return _signed_grid(data, la, batch, real, "head", f"direct effects, layer {layer}", ax)


def logit_layers(la: Any, *, tracked: str | None = None, batch: int = 0, ax: Any = None) -> Any:
    """A layer × source heat map of a ``LogitAttribution``: direct effects (``la.layers``) or
    the rows ``la.tracked(tracked)``."""
    real = la.mask[batch].nonzero().flatten().cpu()
    rows = la.tracked(tracked) if tracked is not None else la.layers
    data = rows[:, batch][:, real].float().cpu().numpy()
    title = f"tracked to the input tokens ({tracked})" if tracked else "direct effects"
    return _signed_grid(data, la, batch, real, "layer", title, ax)


def _signed_grid(data: Any, la: Any, batch: int, real: Any, rows: str, title: str, ax: Any) -> Any:
    fig, ax = _axes(ax)
    top = float(abs(data).max()) if data.size else 1.0
    top = top if top > 0 else 1.0
    image = ax.imshow(data, aspect="auto", cmap="RdBu_r", origin="lower", vmin=-top, vmax=top)
    labels = (
        [la.str_tokens[batch][int(j)] for j in real]
        if la.str_tokens is not None
        else [str(int(j)) for j in real]
    )
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize="small")
    ax.set_ylabel(rows)
    ax.set_xlabel("source")
    ax.set_title(title, fontsize="medium")
    fig.colorbar(image, ax=ax, label="logit units")
    return fig
