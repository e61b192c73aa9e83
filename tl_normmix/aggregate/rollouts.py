"""Across layers: rollout of per-layer maps (methods.md#the-peers-methods).

A per-layer map ``M_l`` says how much receiver ``i`` of layer ``l``'s output takes from token ``j``
of its input. Chaining them gives how much each *input token* reaches every later position:

    M̂_l = rownorm(M_l + I)   (each step optional),    R_first = M̂_first,  R_l = M̂_l R_{l−1}.

Abnar & Zuidema's attention rollout is ``attn_w`` with both steps (the residual as ``+I``, rows
renormalised — not ``0.5·A + 0.5·I``, which it equals only where rows of ``A`` sum to 1). GlobEnc,
ALTI and value zeroing chain their maps as they are: they already hold the residual. Products of
many layers grow or shrink fast (GlobEnc reaches ~1e6 on MiniLM), so they are accumulated in
float64.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from tl_normmix.maps import MixingMaps

__all__ = ["ROLLOUT_DEFAULTS", "rollout"]

#: ``(add_identity, normalize)`` by scope; scopes not listed are chained as they are. Maps without
#: the residual (weights and the pure attention output) get it as ``+I``; ``attnres_w`` has it.
ROLLOUT_DEFAULTS: dict[str, tuple[bool, bool]] = {
    "attn_w": (True, True),
    "attn_n": (True, True),
    "attnres_w": (False, True),
}


def rollout(
    maps: MixingMaps,
    scope: str,
    add_identity: bool | None = None,
    normalize: bool | None = None,
) -> Float[Tensor, "layer batch query_pos key_pos"]:
    """Cumulative products of the per-layer maps of ``scope`` over the computed layers.

    ``R[l]`` is the rollout up to and including the ``l``-th computed layer, ``[layer, batch,
    query, key]`` in float64 (rows receivers at that layer's output, columns input tokens of the
    first computed layer). ``add_identity`` / ``normalize`` default per scope
    (``ROLLOUT_DEFAULTS``: ``attn_w`` and ``attn_n`` both, ``attnres_w`` row normalisation,
    every other scope neither — GlobEnc, ALTI, value zeroing, whole-layer maps). Padded rows and
    columns are zero. The layers must be consecutive: a product that skips a layer is not a rollout.
    """
    layer_maps = maps[scope]
    layers = list(maps.layers)
    if layers != list(range(layers[0], layers[0] + len(layers))):
        raise ValueError(
            f"rollout needs consecutive layers; these maps hold {layers}. Compute the maps with "
            f"layers=range({min(layers)}, {max(layers) + 1}) (or all layers)."
        )
    identity, norm = ROLLOUT_DEFAULTS.get(scope, (False, False))
    identity = identity if add_identity is None else add_identity
    norm = norm if normalize is None else normalize
    return chain_products(layer_maps, maps.mask, add_identity=identity, normalize=norm)


def chain_products(
    layer_maps: Float[Tensor, "layer batch query_pos key_pos"],
    mask: Tensor,
    *,
    add_identity: bool,
    normalize: bool,
) -> Float[Tensor, "layer batch query_pos key_pos"]:
    """``R_0 = M̂_0``, ``R_l = M̂_l R_{l−1}`` with ``M̂ = rownorm(M + I)`` (each step optional),
    in float64 (methods.md#the-peers-methods, rollout); padded rows and columns zero."""
    pair = (mask[:, :, None] & mask[:, None, :]).to(layer_maps.device)
    eye = torch.eye(layer_maps.shape[-1], dtype=torch.float64, device=layer_maps.device)
    out = torch.empty(layer_maps.shape, dtype=torch.float64, device=layer_maps.device)
    current: Tensor | None = None
    for index in range(layer_maps.shape[0]):
        step = layer_maps[index].double().masked_fill(~pair, 0.0)
        if add_identity:
            step = step + eye * pair
        if normalize:
            step = step / step.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        current = step if current is None else torch.matmul(step, current)
        out[index] = current
    return out
