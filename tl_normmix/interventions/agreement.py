"""How well each map ranks the exact effects of interventions on the same cells.

For every edge ``e = (l, h or all, i, j)`` a knock-out ran on and every batch row where it exists,
a map's score is its cell: ``maps[scope][l, b, i, j]`` for all-head edges, the per-head map
``heads[scope][l, b, h, i, j]`` for per-head edges (scopes without per-head maps are skipped for
those). Reported per scope: the Spearman rank correlation between the score and ``|effect|`` over
all edges and rows and per layer, and top-k recall (per row, the share of the ``k`` edges with the
largest ``|effect|`` among the ``k`` with the largest score; averaged over rows). Attributions
(signed first-order effects) enter as ``att.as_maps()``, which holds their absolute values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from tl_normmix.analysis.ranks import spearman
from tl_normmix.interventions.knockout import KnockOut
from tl_normmix.interventions.run import resolve_rows
from tl_normmix.maps import MixingMaps

__all__ = ["Agreement", "agreement"]


@dataclass
class Agreement:
    """``table``: a pandas DataFrame with columns ``scope``, ``layer`` (``"all"`` or an int),
    ``spearman``, ``recall_at_k`` (rows ``"all"`` only), ``edges``."""

    table: Any
    k: int
    mode: str


def agreement(
    maps: MixingMaps | Any | Sequence[MixingMaps | Any],
    ko: KnockOut,
    scopes: Iterable[str] | None = None,
    k: int = 10,
) -> Agreement:
    """Per scope of ``maps`` (one ``MixingMaps`` or several, e.g. ``[maps, att.as_maps()]``; a
    ``LogitAttribution`` gives scopes ``logit`` and ``logit_alti``): Spearman of the map with
    ``|ko.effect|`` per layer and overall, and top-``k`` recall."""
    import pandas as pd

    single = isinstance(maps, MixingMaps) or hasattr(maps, "tracked")
    given: list[Any] = [maps] if single else list(cast(Sequence[Any], maps))
    # a LogitAttribution scores edges (l, position, j) by its direct effects and ALTI-Logit rows
    sources = [m.as_maps(tracked="alti") if hasattr(m, "tracked") else m for m in given]
    available = {scope: m for m in sources for scope in (*m.maps, *m.heads)}
    chosen = list(scopes) if scopes is not None else list(available)
    missing = [s for s in chosen if s not in available]
    if missing:
        raise KeyError(f"Scopes {missing} are not in the maps; these are: {list(available)}.")
    rows = resolve_rows(ko.edges, ko.mask, ko.causal)
    records = []
    for scope in chosen:
        scores, effects, layers, batches = _pairs(available[scope], scope, ko, rows)
        if not scores.numel():
            continue
        records.append(
            {
                "scope": scope,
                "layer": "all",
                "spearman": spearman(scores, effects.abs()),
                "recall_at_k": _recall(scores, effects.abs(), batches, k),
                "edges": int(scores.numel()),
            }
        )
        for layer in sorted(set(layers.tolist())):
            chosen_layer = layers == layer
            records.append(
                {
                    "scope": scope,
                    "layer": int(layer),
                    "spearman": spearman(scores[chosen_layer], effects[chosen_layer].abs()),
                    "recall_at_k": float("nan"),
                    "edges": int(chosen_layer.sum()),
                }
            )
    table = pd.DataFrame.from_records(
        records, columns=["scope", "layer", "spearman", "recall_at_k", "edges"]
    )
    return Agreement(table=table, k=k, mode=ko.mode)


def _pairs(
    maps: MixingMaps, scope: str, ko: KnockOut, rows: list[dict[int, tuple[int, int]]]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(score, effect, layer, batch row) for every edge and row the scope has a cell for."""
    if tuple(maps.mask.shape) != tuple(ko.mask.shape) or not torch.equal(maps.mask, ko.mask):
        raise ValueError(
            "The maps and the knock-out come from different inputs (their masks differ): "
            "compute both on the same tokens."
        )
    layer_map = maps.maps.get(scope)
    head_map = maps.heads.get(scope) if scope in maps.heads else None
    scores, effects, layers, batches = [], [], [], []
    for index, edge in enumerate(ko.edges):
        if edge.layer not in maps.layers:
            continue
        source = layer_map if edge.head is None else head_map
        if source is None:
            continue
        at = maps.layer_index(edge.layer)
        for b, (i, j) in rows[index].items():
            effect = float(ko.effect[index, b])
            if effect != effect:  # NaN: not run in this row
                continue
            if edge.head is None:
                score = float(source[at, b, i, j])
            else:
                score = float(source[at, b, edge.head, i, j])
            scores.append(score)
            effects.append(effect)
            layers.append(edge.layer)
            batches.append(b)
    return (
        torch.tensor(scores, dtype=torch.float64),
        torch.tensor(effects, dtype=torch.float64),
        torch.tensor(layers),
        torch.tensor(batches),
    )


def _recall(scores: Tensor, effects: Tensor, batches: Tensor, k: int) -> float:
    recalls = []
    for b in batches.unique():
        row = batches == b
        count = min(k, int(row.sum()))
        if count == 0:
            continue
        top_effect = set(effects[row].topk(count).indices.tolist())
        top_score = set(scores[row].topk(count).indices.tolist())
        recalls.append(len(top_effect & top_score) / count)
    return float(sum(recalls) / len(recalls)) if recalls else float("nan")
