"""The feed-forward block's per-pair vectors and its outlier dimensions (Kobayashi et al. 2024).

The FF writes a few dimensions that carry most of its per-pair contribution ``IG_ij``; the norm
that next reads the stream has small weights there, cancelling them. ``ff_parts`` computes the
vectors of one layer from a cache; ``ff_outlier_dimensions`` reports per dimension its share of
``Σ_ij ‖IG_ij‖²``, the next norm's weight, and the FF's contextualization change
(``attnresln_n`` → ``attnreslnff_n``) with the top dimensions left out of ``IG``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
from jaxtyping import Bool, Float
from torch import Tensor

from tl_normmix import memory
from tl_normmix.analysis.ranks import spearman, valid_cells
from tl_normmix.decompose import attention
from tl_normmix.decompose.whole_layer import chunk_bytes, hidden_width, whole_layer_maps
from tl_normmix.maps import SCOPES, mixing_maps
from tl_normmix.models.adapter import adapt

__all__ = ["FFOutliers", "FFParts", "ff_outlier_dimensions", "ff_parts"]


@dataclass(frozen=True)
class FFParts:
    """One layer's feed-forward contributions as vectors: ``ig[b, i, j]`` is ``IG_ij``
    (methods.md#the-feed-forward-block), ``before`` the FF input map ``attnresln_n``, ``next_norm``
    the norm that next reads the stream (its name and weight ``γ``)."""

    layer: int
    ig: Float[Tensor, "batch query_pos key_pos d_model"]
    before: Float[Tensor, "batch query_pos key_pos"]
    cells: Bool[Tensor, "batch query_pos key_pos"]
    next_norm: str
    next_weight: Float[Tensor, " d_model"]


def ff_parts(
    model: Any,
    cache: Any,
    layer: int,
    *,
    attention_mask: Tensor | None = None,
    tokens: Tensor | None = None,
) -> FFParts:
    """The per-pair FF vectors ``IG_ij`` of ``layer`` (``N²·d`` floats: for analysis of short
    texts), from a cache made with ``hook_filter(model, "layer_n")``."""
    adapter = adapt(model)
    at = adapter.check_layers(layer)[0]
    before = mixing_maps(
        model, cache, "attnresln_n", layers=at, attention_mask=attention_mask, tokens=tokens
    )
    t = adapter.read(cache, at, SCOPES["attnreslnff_n"].roles(adapter.layout))
    mask = before.mask
    batch, n, d = t["resid_pre"].shape
    ig = t.pattern.new_zeros(batch, n, n, d)

    def keep(start: int, stop: int, chunk: Tensor) -> None:
        ig[:, start:stop, : chunk.shape[1]] = chunk.transpose(1, 2)  # later keys: zero

    pattern = attention.masked_pattern(t.pattern, mask)
    per_receiver = chunk_bytes(batch, n, 1, d, hidden_width(t.mlp))
    chunk = memory.rows_per_chunk(per_receiver, n, device=t.device)
    whole_layer_maps(t, pattern, mask, {}, chunk=chunk, ff_sink=keep)
    name, norm = adapter.next_norm(at)
    cells = valid_cells(mask, adapter.spec.causal)
    return FFParts(at, ig, before["attnresln_n"][0], cells, name, norm.weight)


@dataclass(frozen=True)
class FFOutliers:
    """``table``: per dimension (sorted by share) its share of ``Σ_ij ‖IG_ij‖²``, the next norm's
    weight and that weight's ratio to the median ``|γ|``; ``dims``: the ``top`` dimensions;
    ``change`` / ``change_without``: the FF's contextualization change (``1 − ρ`` of
    ``attnresln_n`` and ``‖IG‖``, mean over the batch) with all dimensions and without ``dims``."""

    layer: int
    table: pd.DataFrame
    dims: list[int]
    change: float
    change_without: float
    next_norm: str


def ff_outlier_dimensions(parts: FFParts, layer: int, top: int = 5) -> FFOutliers:
    """The dimensions the FF of ``layer`` writes most, and what the next norm does with them."""
    if not isinstance(parts, FFParts):
        raise TypeError(
            "ff_outlier_dimensions needs the FF's per-pair vectors: pass "
            f"nm.analysis.ff_parts(model, cache, {layer}) (cache from "
            "run_with_cache(tokens, names_filter=nm.hook_filter(model, 'layer_n')))."
        )
    if parts.layer != layer:
        raise ValueError(f"These parts are of layer {parts.layer}, not {layer}.")
    cells = parts.cells
    ig = parts.ig.double()
    energy = (ig.square() * cells[..., None]).sum(dim=(0, 1, 2))
    share = energy / energy.sum().clamp_min(1e-300)
    order = share.argsort(descending=True)
    dims = [int(k) for k in order[:top]]
    weight = parts.next_weight.double()
    median = weight.abs().median().clamp_min(1e-300)
    table = pd.DataFrame(
        {
            "share": share[order].numpy(),
            "next_norm_weight": weight[order].numpy(),
            "weight_vs_median": (weight[order].abs() / median).numpy(),
        },
        index=pd.Index(order.numpy(), name="dimension"),
    )
    without = ig.clone()
    without[..., dims] = 0.0

    def change(vectors: Tensor) -> float:
        after = vectors.norm(dim=-1)
        values = [
            1.0 - spearman(parts.before[b][cells[b]].double(), after[b][cells[b]])
            for b in range(after.shape[0])
        ]
        return float(sum(values) / len(values))

    return FFOutliers(layer, table, dims, change(ig), change(without), parts.next_norm)
