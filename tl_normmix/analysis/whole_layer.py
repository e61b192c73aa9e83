"""Analyses of whole-layer maps (Kobayashi et al. 2024), from a ``MixingMaps``.

* **Contextualization change** between two scopes of the same layer: ``1 − ρ`` with ``ρ`` the
  Spearman rank correlation of the two maps over the *valid cells* of one sentence
  (``analysis.ranks.valid_cells``).
* **FF amplification**: each map is normalised per receiver to shares ``m_ij / Σ_j m_ij`` over
  valid cells; the pairs ``(i ← j)``, ``j ≠ i``, whose share grows most from the FF input map
  (``attnresln_n``) to the FF output map (``attnreslnff_n``) are the pairs the FF amplifies.
* ``diff``: the maps of two runs of the same shape, subtracted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from tl_normmix.analysis.ranks import spearman, valid_cells
from tl_normmix.maps import MixingMaps

__all__ = ["FF_STEPS", "AmplifiedPair", "contextualization_change", "diff", "ff_amplified_pairs"]

#: The consecutive whole-layer steps whose contextualization change the paper reports.
FF_STEPS = {
    "FF": ("attnresln_n", "attnreslnff_n"),
    "RES2": ("attnreslnff_n", "attnreslnffres_n"),
    "LN2": ("attnreslnffres_n", "attnreslnffresln_n"),
}


def contextualization_change(
    maps: MixingMaps, before: str, after: str
) -> Float[Tensor, "layer batch"]:
    """``1 − Spearman ρ`` between the maps of ``before`` and ``after`` over each sentence's valid
    cells, per computed layer and batch row."""
    first, second = maps[before], maps[after]
    cells = valid_cells(maps.mask, maps.causal)
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
    cells = valid_cells(maps.mask, maps.causal)
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
