"""The attention-block scopes of one layer (METHODS.md §1–2), from the adapter's tensors.

Everything shared between scopes is computed once per layer: the masked pattern, its head
mean, the source vectors ``f^h(x_j)`` (a chunk of sources at a time), the self and context
parts, and one chunked pass of quadratic forms for all norm scopes (``residual.decompose``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from jaxtyping import Bool, Float
from torch import Tensor

from tl_normmix import attention, residual
from tl_normmix.adapter import LayerTensors
from tl_normmix.scopes import NORM_CHAINS, NORM_SCOPES

__all__ = ["LayerMaps", "layer_maps", "mask_padding", "norm_chain"]


@dataclass
class LayerMaps:
    maps: dict[str, Float[Tensor, "batch query_pos key_pos"]]
    ratios: dict[str, Float[Tensor, "batch query_pos"]]
    pattern: Float[Tensor, "batch head_index query_pos key_pos"]  # masked (attn_w per head)
    value_norms: Float[Tensor, "batch head_index pos"] | None  # ‖f^h(x_j)‖, masked


def layer_maps(
    t: LayerTensors, mask: Bool[Tensor, "batch pos"], scopes: Iterable[str], value_norms: bool
) -> LayerMaps:
    """Layer maps and mixing ratios of ``scopes`` for one layer; padded cells are zero."""
    scopes = list(scopes)
    padded = not bool(mask.all())
    pattern = attention.masked_pattern(t.pattern, mask) if padded else t.pattern
    maps: dict[str, Tensor] = {}
    ratios: dict[str, Tensor] = {}
    if {"attn_w", "attnres_w"} & set(scopes):
        mean = attention.head_mean(pattern)
        others = _off_diagonal_sum(mean)
        if "attn_w" in scopes:
            maps["attn_w"], ratios["attn_w"] = mean, others
        if "attnres_w" in scopes:
            half = 0.5 * mean
            half.diagonal(dim1=-2, dim2=-1).add_(0.5)
            maps["attnres_w"], ratios["attnres_w"] = half, 0.5 * others
    norms = None
    requested = [s for s in scopes if s in NORM_SCOPES]
    if requested:
        mixed = t["attn_out"] - t.b_O if "attn_out" in t.hooks else None
        requests = {s: _request(t, s) for s in requested}
        result = residual.decompose(pattern, t.v, t.W_O, requests, mixed=mixed)
        for scope, (layer_map, ratio) in result.maps.items():
            maps[scope], ratios[scope] = layer_map, ratio
        norms = result.value_norms
    elif value_norms:
        norms = attention.value_norms(t.v, t.W_O)
    if padded:  # every map here is a fresh tensor: mask in place
        mask_padding(maps, ratios, mask)
        if norms is not None:
            norms = norms * mask[:, None, :]
    return LayerMaps(maps=maps, ratios=ratios, pattern=pattern, value_norms=norms)


def _off_diagonal_sum(weights: Tensor) -> Tensor:
    return weights.sum(-1) - weights.diagonal(dim1=-2, dim2=-1)


def _request(t: LayerTensors, scope: str) -> residual.Request:
    if scope == "attn_n":
        return residual.Request()
    pre, post = NORM_CHAINS[(scope, t.spec.kind)]
    return residual.Request(t["resid_pre"], norm_chain(t, pre), norm_chain(t, post))


def norm_chain(t: LayerTensors, names: tuple[str, ...]) -> residual.NormChain:
    """The layer's norms ``names``, in order, with their cached scales."""
    return residual.NormChain([(t.norms[n], t[f"{n}.scale"]) for n in names])


def mask_padding(maps: dict[str, Tensor], ratios: dict[str, Tensor], mask: Tensor) -> None:
    """Zero the padded cells of fresh maps and set padded tokens' ratios to NaN, in place."""
    if bool(mask.all()):
        return
    pair = mask[:, :, None] & mask[:, None, :]
    for layer_map in maps.values():
        layer_map.masked_fill_(~pair, 0.0)
    for ratio in ratios.values():
        ratio.masked_fill_(~mask, float("nan"))
