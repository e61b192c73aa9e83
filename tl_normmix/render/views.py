"""CircuitsVis views of a ``MixingMaps`` (a consumer: it reads only the maps).

Each function returns a ``page.View`` (or a ``page.Row`` of views) that renders itself in a
notebook and can be placed in a report page. Only the real tokens of the chosen batch row are
shown; rows are receivers (queries), columns sources (keys), as everywhere in tl_normmix.

Colour scales: ``attn_w`` and ``attnres_w`` are probabilities (0 to 1); every norm map is not,
so its maximum is taken from the data shown (per view; per-head views share one maximum so heads
compare), unless ``max_value`` is given.

>>> nm.views.heads(maps, "attn_n", layer=3)          # doctest: +SKIP
>>> nm.views.compare(maps, layer=3).save("compare.html")   # doctest: +SKIP
>>> nm.views.save([view_a, view_b], "views.html")    # doctest: +SKIP

In a notebook the CircuitsVis bundle goes into the session's first output only;
``nm.views.bundle_mode("inline" | "cdn" | "once")`` changes that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from tl_normmix.aggregate.rollouts import rollout as rollout_of
from tl_normmix.maps import MixingMaps
from tl_normmix.render.page import Row, View, bundle_mode, save

__all__ = [
    "PROBABILITY_SCOPES",
    "Row",
    "View",
    "bundle_mode",
    "compare",
    "effects",
    "heads",
    "logit_layers",
    "logit_tokens",
    "methods",
    "reads_from",
    "rollout",
    "routes",
    "save",
    "value_norms",
    "writes_to",
]

#: Scopes whose rows are probability distributions: coloured on a fixed 0–1 scale.
PROBABILITY_SCOPES = frozenset({"attn_w", "attnres_w"})

_DIGITS = 4  # significant digits kept in the page (hover values)


def heads(
    maps: MixingMaps, scope: str, layer: int, *, batch: int = 0, max_value: float | None = None
) -> View:
    """``AttentionHeads`` for ``scope`` at ``layer``: one pattern per head where the scope has
    per-head maps (``attn_w``, ``attn_n``), else the single layer map."""
    index = maps.layer_index(layer)
    real = _real(maps, batch)
    if scope in maps.heads:
        data = maps.heads[scope][index, batch][:, real][:, :, real]
        names = [f"L{layer}H{h}" for h in range(data.shape[0])]
        what = "per head"
    else:
        data = maps[scope][index, batch][real][:, real][None]
        names = [f"L{layer} {scope}"]
        what = "layer map"
    top = _scale(scope, data, max_value)
    return View(
        "AttentionHeads",
        {
            "attention": _numbers(data),
            "tokens": _labels(maps, batch, real),
            "attentionHeadNames": names,
            "maxValue": top,
            "minValue": 0.0,
            "maskUpperTri": maps.causal,
        },
        title=f"{scope} — layer {layer} ({what})",
        caption=_scale_caption(scope, top),
    )


def compare(
    maps: MixingMaps,
    layer: int,
    scopes: Sequence[str] | None = None,
    *,
    batch: int = 0,
    head: int | None = None,
) -> Row:
    """The maps of several scopes for one layer side by side (default: every scope computed,
    in execution order), each with its own colour scale; ``head`` shows one head of scopes
    that have per-head maps."""
    scopes = tuple(scopes) if scopes is not None else maps.scopes
    index = maps.layer_index(layer)
    real = _real(maps, batch)
    if head is not None:
        missing = [s for s in scopes if s not in maps.heads]
        if missing:
            raise ValueError(
                f"Scopes {missing} have no per-head maps (per-head: {list(maps.heads)}); "
                "leave head=None to compare layer maps."
            )
    views = []
    for scope in scopes:
        if head is None:
            data = maps[scope][index, batch][real][:, real]
        else:
            data = maps.heads[scope][index, batch, head][real][:, real]
        top = _scale(scope, data, None)
        views.append(
            View(
                "AttentionPattern",
                {
                    "attention": _numbers(data),
                    "tokens": _labels(maps, batch, real),
                    "maxValue": top,
                    "minValue": 0.0,
                    "maskUpperTri": maps.causal,
                    "showAxisLabels": True,
                },
                title=scope,
                caption=_scale_caption(scope, top),
            )
        )
    which = f", head {head}" if head is not None else ""
    return Row(tuple(views), title=f"Layer {layer}{which}: {' | '.join(scopes)}")


def reads_from(maps: MixingMaps, scope: str, layer: int, token: int, *, batch: int = 0) -> View:
    """``ColoredTokens``: how much each source ``j`` contributes to token ``token`` (row i)."""
    real = _real(maps, batch)
    i = _position(maps, batch, token)
    row = maps[scope][maps.layer_index(layer), batch, i][real]
    label = _labels(maps, batch, real)[int((real < i).sum())]
    return _colored(maps, batch, real, row, scope, f"{label!r}@{i} reads from — {scope}, L{layer}")


def writes_to(maps: MixingMaps, scope: str, layer: int, token: int, *, batch: int = 0) -> View:
    """``ColoredTokens``: how much token ``token`` (column j) contributes to each receiver."""
    real = _real(maps, batch)
    j = _position(maps, batch, token)
    column = maps[scope][maps.layer_index(layer), batch][:, j][real]
    label = _labels(maps, batch, real)[int((real < j).sum())]
    return _colored(
        maps, batch, real, column, scope, f"{label!r}@{j} writes to — {scope}, L{layer}"
    )


def value_norms(maps: MixingMaps, layer: int, *, batch: int = 0) -> View:
    """``ColoredTokensMulti``: the value norms ``‖f^h(x_j)‖`` per source token — mean over heads
    and each head (the sink view: a heavily attended token that writes little)."""
    if maps.value_norms is None:
        raise ValueError("No value norms: call mixing_maps(..., value_norms=True).")
    real = _real(maps, batch)
    norms = maps.value_norms[maps.layer_index(layer), batch][:, real]  # [head, key]
    values = torch.cat([norms.mean(0, keepdim=True), norms]).T  # [key, 1 + head]
    return View(
        "ColoredTokensMulti",
        {
            "tokens": _labels(maps, batch, real),
            "values": _numbers(values),
            "labels": ["mean over heads"] + [f"head {h}" for h in range(norms.shape[0])],
        },
        title=f"value norms ‖f^h(x_j)‖ — layer {layer}",
        caption="hover a token for every head; pick a head to colour by it",
    )


def effects(
    effects_maps: MixingMaps,
    maps: MixingMaps,
    layer: int,
    *,
    receiver: int = -1,
    scopes: Sequence[str] | None = None,
    head: int | None = None,
    batch: int = 0,
) -> View:
    """``ColoredTokensMulti`` for one receiver at ``layer``: the exact effect of removing each
    source's edge (``ko.as_maps()``; all heads together, or ``head``) beside each scope's map row
    — where the token reads from, by intervention and by each map. Sources without an edge
    (future tokens, edges not run) show 0."""
    real = _real(maps, batch)
    i = _position(maps, batch, receiver)
    index = effects_maps.layer_index(layer)
    if head is None:
        effect = effects_maps["effect"][index, batch, i][real]
    else:
        effect = effects_maps.heads["effect"][index, batch, head, i][real]
    effect = torch.nan_to_num(effect, nan=0.0)
    chosen = tuple(scopes) if scopes is not None else maps.scopes
    columns = [effect]
    labels = ["effect of removing the edge" + (f" (head {head})" if head is not None else "")]
    for scope in chosen:
        if head is not None and scope in maps.heads:
            columns.append(maps.heads[scope][maps.layer_index(layer), batch, head, i][real])
            labels.append(f"{scope} (head {head})")
        else:
            columns.append(maps[scope][maps.layer_index(layer), batch, i][real])
            labels.append(scope)
    label = _labels(maps, batch, real)[int((real < i).sum())]
    return View(
        "ColoredTokensMulti",
        {
            "tokens": _labels(maps, batch, real),
            "values": _numbers(torch.stack(columns, dim=1)),
            "labels": labels,
        },
        title=f"{label!r}@{i} reads from, layer {layer}: exact effects and maps",
        caption="pick a column to colour by it; effects are metric(edited) − metric(clean)",
    )


def rollout(
    maps: MixingMaps,
    scope: str,
    *,
    batch: int = 0,
    add_identity: bool | None = None,
    normalize: bool | None = None,
) -> View:
    """``AttentionHeads`` with one pattern per layer: the rollout of ``scope`` up to that layer
    (``nm.rollout``, its per-scope defaults). Each row is shown as shares of its sum, so layers
    compare even where the products grow (GlobEnc reaches ~1e6)."""
    real = _real(maps, batch)
    rolled = rollout_of(maps, scope, add_identity=add_identity, normalize=normalize)
    data = rolled[:, batch][:, real][:, :, real]
    data = data / data.sum(-1, keepdim=True).clamp_min(torch.finfo(data.dtype).tiny)
    return View(
        "AttentionHeads",
        {
            "attention": _numbers(data),
            "tokens": _labels(maps, batch, real),
            "attentionHeadNames": [f"up to L{layer}" for layer in maps.layers],
            "maxValue": 1.0,
            "minValue": 0.0,
            "maskUpperTri": maps.causal,
        },
        title=f"rollout of {scope} (one pattern per layer: the product up to it)",
        caption="rows as shares of their sum: colour scale 0–1",
    )


def routes(maps: MixingMaps, receiver: int = -1, *, batch: int = 0) -> View:
    """``ColoredTokensMulti``: where ``receiver`` reads from in each layer by ALTI's per-(head,
    source) contributions summed over heads (information-flow routes; ``maps.heads["alti"]``),
    the residual's share in each column's label."""
    real = _real(maps, batch)
    i = _position(maps, batch, receiver)
    per_layer = maps.heads["alti"][:, batch, :, i].sum(1)[:, real]  # [layer, key]
    share = maps.residual_share["alti"][:, batch, i]
    labels = [
        f"L{layer} (residual {float(r):.2f})" for layer, r in zip(maps.layers, share, strict=True)
    ]
    label = _labels(maps, batch, real)[int((real < i).sum())]
    return View(
        "ColoredTokensMulti",
        {
            "tokens": _labels(maps, batch, real),
            "values": _numbers(per_layer.T),
            "labels": labels,
        },
        title=f"{label!r}@{i}: ALTI routes per layer (heads summed; residual in the label)",
        caption="pick a layer to colour by it; shares of all parts of the row, residual included",
    )


def methods(
    columns: Mapping[str, Tensor], maps: MixingMaps, receiver: int = -1, *, batch: int = 0
) -> View:
    """``ColoredTokensMulti``: one receiver's row by several methods (``columns``: name ->
    ``[batch, query, key]`` maps over the same tokens as ``maps``), each as shares of its sum."""
    real = _real(maps, batch)
    i = _position(maps, batch, receiver)
    values = []
    for row in columns.values():
        picked = row[batch, i][real].double().abs()
        values.append(picked / picked.sum().clamp_min(torch.finfo(picked.dtype).tiny))
    label = _labels(maps, batch, real)[int((real < i).sum())]
    return View(
        "ColoredTokensMulti",
        {
            "tokens": _labels(maps, batch, real),
            "values": _numbers(torch.stack(values, dim=1)),
            "labels": list(columns),
        },
        title=f"{label!r}@{i} reads from, by method",
        caption="each method's row as shares of its sum; pick a method to colour by it",
    )


def logit_tokens(
    la: Any, *, tracked: str | None = None, layer: int | None = None, batch: int = 0
) -> View:
    """``ColoredTokens`` with signed colours: what each source token contributed to the readout of
    a ``LogitAttribution`` — its direct effects (``la.layers``) or, with ``tracked``, the rows
    carried to the input tokens (``la.tracked(tracked)``), summed over layers or at ``layer``."""
    rows = la.tracked(tracked) if tracked is not None else la.layers
    real = _real_of(la, batch)
    data = rows[:, batch] if layer is None else rows[layer, batch][None]
    values = data.sum(0)[real].float()
    top = float(values.abs().max()) if values.numel() else 0.0
    top = top if top > 0 else 1.0
    what = f"tracked ({tracked})" if tracked is not None else "direct effects"
    where = "all layers" if layer is None else f"layer {layer}"
    return View(
        "ColoredTokens",
        {
            "tokens": _labels_of(la, batch, real),
            "values": _numbers(values),
            "maxValue": top,
            "minValue": -top,
        },
        title=f"{_readout_name(la, batch)} at position {int(la.position[batch])}: {what}, {where}",
        caption=f"signed: colour scale −{top:.4g} to {top:.4g} (logit units)",
    )


def logit_layers(
    la: Any, *, tracked: str | None = None, layer: int | None = None, batch: int = 0
) -> View:
    """``ColoredTokensMulti``: one signed column per layer (direct effects, or the ``tracked``
    rows), or, given ``layer``, one per head of that layer (its direct effects)."""
    real = _real_of(la, batch)
    if layer is None:
        rows = la.tracked(tracked) if tracked is not None else la.layers
        columns = rows[:, batch][:, real].float()
        labels = [f"L{index}" for index in range(columns.shape[0])]
    else:
        columns = la.heads[layer, batch][:, real].float()
        labels = [f"L{layer}H{head}" for head in range(columns.shape[0])]
    return View(
        "ColoredTokensMulti",
        {
            "tokens": _labels_of(la, batch, real),
            "values": _numbers(columns.T),
            "labels": labels,
        },
        title=f"{_readout_name(la, batch)} at position {int(la.position[batch])}, by "
        + ("layer" if layer is None else f"head of layer {layer}"),
        caption="pick a column to colour by it; signed values in logit units",
    )


def _real_of(la: Any, batch: int) -> Tensor:
    if not 0 <= batch < la.mask.shape[0]:
        raise IndexError(f"batch {batch} out of range: the attribution holds {la.mask.shape[0]}.")
    return la.mask[batch].nonzero().flatten().cpu()


def _labels_of(la: Any, batch: int, real: Tensor) -> list[str]:
    if la.str_tokens is None:
        return [str(int(j)) for j in real]
    return [la.str_tokens[batch][int(j)] for j in real]


def _readout_name(la: Any, batch: int) -> str:
    if la.target is None:
        return "the direction"
    name = f"logit {int(la.target[batch])}"
    return name + (f" − logit {int(la.foil[batch])}" if la.foil is not None else "")


def _colored(
    maps: MixingMaps, batch: int, real: Tensor, values: Tensor, scope: str, title: str
) -> View:
    top = _scale(scope, values, None)
    return View(
        "ColoredTokens",
        {
            "tokens": _labels(maps, batch, real),
            "values": _numbers(values),
            "maxValue": top,
            "minValue": 0.0,
        },
        title=title,
        caption=_scale_caption(scope, top),
    )


def _real(maps: MixingMaps, batch: int) -> Tensor:
    if not 0 <= batch < maps.mask.shape[0]:
        raise IndexError(f"batch {batch} out of range: the maps hold {maps.mask.shape[0]} rows.")
    return maps.mask[batch].nonzero().flatten().cpu()


def _position(maps: MixingMaps, batch: int, token: int) -> int:
    """A position in the sequence; negative: counted from the last real token."""
    real = _real(maps, batch)
    if token < 0:
        if -token > len(real):
            raise IndexError(f"token {token}: batch row {batch} has {len(real)} real tokens.")
        return int(real[token])
    if token not in real.tolist():
        raise IndexError(
            f"Position {token} is not a real token of batch row {batch} "
            f"(real positions: {real[0]}..{real[-1]}, padding excluded)."
        )
    return token


def _labels(maps: MixingMaps, batch: int, real: Tensor) -> list[str]:
    if maps.str_tokens is None:
        return [str(int(j)) for j in real]
    return [maps.str_tokens[batch][int(j)] for j in real]


def _scale(scope: str, data: Tensor, max_value: float | None) -> float:
    if max_value is not None:
        return float(max_value)
    if scope in PROBABILITY_SCOPES:
        return 1.0
    top = float(data.max()) if data.numel() else 0.0
    return top if top > 0 else 1.0


def _scale_caption(scope: str, top: float) -> str:
    if scope in PROBABILITY_SCOPES:
        return "weights: colour scale 0–1"
    return f"norms: colour scale 0–{top:.4g} (maximum of the data shown)"


def _numbers(data: Tensor) -> list:
    """Nested lists of floats with ``_DIGITS`` significant digits (the page stays small)."""
    values = data.detach().float().cpu()
    if not bool(torch.isfinite(values).all()):
        raise ValueError("The map holds NaN or infinite values; nothing to render.")
    flat = [float(f"{x:.{_DIGITS}g}") for x in values.flatten().tolist()]
    return _nest(flat, list(values.shape))


def _nest(flat: list[float], shape: list[int]) -> list:
    if len(shape) <= 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [_nest(flat[k * step : (k + 1) * step], shape[1:]) for k in range(shape[0])]
