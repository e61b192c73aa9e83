"""Analyses of whole-layer maps (Kobayashi et al. 2024; METHODS.md §3), from a ``MixingMaps``.

* **Contextualization change** between two scopes of the same layer: ``1 − ρ`` with ``ρ`` the
  Spearman rank correlation of the two maps over the *valid cells* of one sentence — pairs of
  real tokens, and for causal models only ``j ≤ i`` (the future cells are zero in every map and
  would inflate ``ρ``).
* **FF amplification**: each map is normalised per receiver to shares ``m_ij / Σ_j m_ij`` over
  valid cells; the pairs ``(i ← j)``, ``j ≠ i``, whose share grows most from the FF input map
  (``attnresln_n``) to the FF output map (``attnreslnff_n``) are the pairs the FF amplifies.
* **FF outlier dimensions** (the 2024 paper's FF / layer-norm interplay): the FF writes a few
  dimensions that carry most of its per-pair contribution ``IG_ij``; the norm that next reads the
  stream has small weights there, cancelling them. Per dimension: its share of
  ``Σ_ij ‖IG_ij‖²``, the next norm's weight, and the FF's contextualization change
  (``attnresln_n`` → ``attnreslnff_n``) with the top dimensions left out of ``IG``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_normmix.decompose.attention_block import layer_maps
from tl_normmix.decompose.blocks import MULTIPLIER, Stage
from tl_normmix.decompose.whole_layer import whole_layer_maps
from tl_normmix.layer_engine import resolve_mask
from tl_normmix.maps import MixingMaps
from tl_normmix.models.adapter import adapt
from tl_normmix.models.structure import norm_spec
from tl_normmix.scopes import SCOPES, scope_roles

__all__ = [
    "AmplifiedPair",
    "FFOutliers",
    "FFParts",
    "contextualization_change",
    "ff_amplified_pairs",
    "ff_outlier_dimensions",
    "ff_parts",
    "spearman",
    "valid_cells",
]

#: The consecutive whole-layer steps whose contextualization change the paper reports.
FF_STEPS = {
    "FF": ("attnresln_n", "attnreslnff_n"),
    "RES2": ("attnreslnff_n", "attnreslnffres_n"),
    "LN2": ("attnreslnffres_n", "attnreslnffresln_n"),
}


def valid_cells(maps: MixingMaps) -> Bool[Tensor, "batch query_pos key_pos"]:
    """Pairs of real tokens; for causal models only ``j ≤ i``."""
    pair = maps.mask[:, :, None] & maps.mask[:, None, :]
    if maps.causal:
        n = maps.mask.shape[-1]
        pair = pair & torch.ones(n, n, dtype=torch.bool, device=pair.device).tril()
    return pair


def _ranks(x: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    values, order = x.sort()
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1.0) / 2.0  # 1-based mean rank of each tie group
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = average[inverse]
    return ranks


def spearman(a: Float[Tensor, " n"], b: Float[Tensor, " n"]) -> float:
    """Spearman's ``ρ`` of two vectors (NaN if either is constant or ``n < 2``)."""
    if a.numel() < 2:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denominator) if denominator > 0 else float("nan")


def contextualization_change(
    maps: MixingMaps, before: str, after: str
) -> Float[Tensor, "layer batch"]:
    """``1 − Spearman ρ`` between the maps of ``before`` and ``after`` over each sentence's valid
    cells, per computed layer and batch row."""
    first, second = maps[before], maps[after]
    cells = valid_cells(maps)
    out = torch.empty(first.shape[:2], dtype=torch.float64)
    for layer in range(first.shape[0]):
        for b in range(first.shape[1]):
            keep = cells[b]
            out[layer, b] = 1.0 - spearman(first[layer, b][keep], second[layer, b][keep])
    return out


@dataclass(frozen=True)
class AmplifiedPair:
    """Receiver ``query`` reading source ``key``: its share before and after the FF."""

    layer: int
    batch: int
    query: int
    key: int
    query_token: str
    key_token: str
    share_before: float
    share_after: float

    @property
    def gain(self) -> float:
        return self.share_after - self.share_before


def _shares(layer_map: Tensor, cells: Tensor) -> Tensor:
    masked = layer_map * cells
    return masked / masked.sum(-1, keepdim=True).clamp_min(torch.finfo(masked.dtype).tiny)


def ff_amplified_pairs(
    maps: MixingMaps,
    k: int = 20,
    *,
    before: str = "attnresln_n",
    after: str = "attnreslnff_n",
    exclude_keys: tuple[int, ...] = (),
) -> dict[int, list[AmplifiedPair]]:
    """Per computed layer, the ``k`` pairs ``(i ← j)``, ``j ≠ i``, whose share grows most from
    ``before`` to ``after`` (default: through the feed-forward block), over every batch row.
    ``exclude_keys``: source positions left out of the ranking (e.g. ``(0,)``, a sink token);
    shares are still computed over all valid cells."""
    cells = valid_cells(maps)
    n = cells.shape[-1]
    off_diagonal = cells & ~torch.eye(n, dtype=torch.bool, device=cells.device)
    if exclude_keys:
        off_diagonal[..., list(exclude_keys)] = False
    out: dict[int, list[AmplifiedPair]] = {}
    for index, layer in enumerate(maps.layers):
        share_before = _shares(maps[before][index], cells)
        share_after = _shares(maps[after][index], cells)
        gain = (share_after - share_before).masked_fill(~off_diagonal, float("-inf"))
        count = min(k, int(off_diagonal.sum()))
        top = gain.flatten().topk(count).indices
        pairs = []
        for flat in top.tolist():
            b, i, j = flat // (n * n), (flat // n) % n, flat % n
            pairs.append(
                AmplifiedPair(
                    layer=layer,
                    batch=b,
                    query=i,
                    key=j,
                    query_token=_token(maps, b, i),
                    key_token=_token(maps, b, j),
                    share_before=float(share_before[b, i, j]),
                    share_after=float(share_after[b, i, j]),
                )
            )
        out[layer] = pairs
    return out


def _token(maps: MixingMaps, b: int, position: int) -> str:
    if maps.str_tokens is not None:
        return maps.str_tokens[b][position]
    if maps.tokens is not None:
        return str(int(maps.tokens[b, position]))
    return str(position)


def diff(maps_a: MixingMaps, maps_b: MixingMaps) -> MixingMaps:
    """``maps_b − maps_a`` for the scopes both hold (layer maps, per-head maps, mixing ratios):
    the maps of two runs of the same shape, e.g. clean and corrupted or patched. Cells padded in
    either run are zero (ratios NaN); the result's mask is where both runs have tokens."""
    if maps_a.layers != maps_b.layers or maps_a.mask.shape != maps_b.mask.shape:
        raise ValueError(
            f"The two maps differ in layers ({maps_a.layers} vs {maps_b.layers}) or shape "
            f"({tuple(maps_a.mask.shape)} vs {tuple(maps_b.mask.shape)}): compute both on runs "
            "of the same length and layers."
        )
    common = [s for s in maps_b.maps if s in maps_a.maps]
    if not common:
        raise ValueError(f"No scope in common: {list(maps_a.maps)} vs {list(maps_b.maps)}.")
    mask = maps_a.mask & maps_b.mask
    pair = (mask[:, :, None] & mask[:, None, :])[None]
    heads = {
        s: (maps_b.heads[s] - maps_a.heads[s]) * pair[:, :, None]
        for s in maps_b.heads
        if s in maps_a.heads
    }
    return MixingMaps(
        layers=maps_b.layers,
        maps={s: (maps_b.maps[s] - maps_a.maps[s]) * pair for s in common},
        heads=heads,
        ratios={
            s: (maps_b.ratios[s] - maps_a.ratios[s]).masked_fill(~mask[None], float("nan"))
            for s in common
            if s in maps_a.ratios and s in maps_b.ratios
        },
        mask=mask,
        convention=maps_b.convention,
        model_name=maps_b.model_name,
        tokens=maps_b.tokens,
        str_tokens=maps_b.str_tokens,
        causal=maps_b.causal,
    )


@dataclass(frozen=True)
class FFParts:
    """One layer's feed-forward contributions as vectors: ``ig[b, i, j]`` is ``IG_ij`` (METHODS
    §3), ``before`` the FF input map ``attnresln_n``, ``next_norm`` the norm that next reads the
    stream (its name and weight ``γ``)."""

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
    layout = adapter.layout
    roles = scope_roles(SCOPES["attnreslnff_n"], layout) | scope_roles(
        SCOPES["attnresln_n"], layout
    )
    t = adapter.read(cache, adapter.check_layers(layer)[0], roles)
    mask = resolve_mask(adapter, attention_mask, tokens, t)
    result = layer_maps(t, mask, {"attnresln_n": Stage.ATTN_RES_LN}, value_norms=False)
    assert result.pattern is not None
    batch, n, d = t["resid_pre"].shape
    ig = t.pattern.new_zeros(batch, n, n, d)

    def keep(start: int, stop: int, chunk: Tensor) -> None:
        ig[:, start:stop, : chunk.shape[1]] = chunk.transpose(1, 2)  # later keys: zero

    whole_layer_maps(t, result.pattern, mask, {}, ff_sink=keep)
    name, weight = _next_norm(adapter, layer)
    view = MixingMaps(
        layers=(layer,),
        maps={},
        heads={},
        ratios={},
        mask=mask,
        convention="",
        model_name="",
        causal=adapter.spec.causal,
    )
    return FFParts(layer, ig, result.maps["attnresln_n"], valid_cells(view), name, weight)


def _next_norm(adapter: Any, layer: int) -> tuple[str, Tensor]:
    """The first norm after the FF output: its own (sandwich), the block's post norm (post-LN),
    the next block's attention-input norm or the final norm."""
    layout = adapter.layout
    for chain, at in ((layout.mlp_out, layer), (layout.post, layer)):
        names = [n for n in chain if n != MULTIPLIER]
        if names:
            return f"blocks.{at}.{names[0]}", norm_spec(
                adapter.model, adapter.structure, at, names[0]
            ).weight
    following = [n for n in (*layout.attn_in, *layout.attn_out) if n != MULTIPLIER]
    if layer + 1 < adapter.spec.n_layers and following:
        spec = norm_spec(adapter.model, adapter.structure, layer + 1, following[0])
        return f"blocks.{layer + 1}.{following[0]}", spec.weight
    final = adapter.final_norm()
    if final is None:
        raise ValueError(f"No norm reads the stream after layer {layer}'s feed-forward block.")
    return "ln_final", final.weight


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


def ff_outlier_dimensions(
    maps_or_parts: FFParts | MixingMaps, layer: int, top: int = 5
) -> FFOutliers:
    """The dimensions the FF of ``layer`` writes most, and what the next norm does with them."""
    if isinstance(maps_or_parts, MixingMaps):
        raise TypeError(
            "ff_outlier_dimensions needs the FF's per-pair vectors (MixingMaps keeps no vectors): "
            f"pass nm.analysis.ff_parts(model, cache, {layer}) (cache from "
            "run_with_cache(tokens, names_filter=nm.hook_filter(model, 'layer_n')))."
        )
    parts = maps_or_parts
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
