"""``decompose_model``: per-input-token vectors carried through every block (METHODS.md §4).

The exact counterpart of DecompX (Modarressi et al. 2023): the block outputs of a cached run
are split over the input tokens, ``x^l_i = Σ_j D^l_ij + bias^l_i``, through attention (with the
real attention weights), norms (frozen scales) and feed-forward blocks (integrated gradients along
the decomposed input, METHODS §3) — no linearisation of the activation. ``maps`` holds ``‖D^l_ij‖``;
``completeness`` the relative residual of ``Σ_j D^l_ij + bias^l_i`` against the cached block output.

>>> _, cache = model.run_with_cache(tokens, names_filter=nm.hook_filter(model, "layer_n"))
... # doctest: +SKIP
>>> dm = nm.decompose_model(model, cache)
>>> dm.maps[-1, 0, -1]            # how much of the last token's final state each input token wrote
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm import tqdm

from tl_normmix.decompose import attention
from tl_normmix.decompose.carried import Carried, carry_block, initial, value_parts
from tl_normmix.decompose.whole_layer import DEFAULT_BUDGET_BYTES, FFOptions, hidden_width
from tl_normmix.layer_engine import resolve_mask
from tl_normmix.models.adapter import adapt
from tl_normmix.models.checks import verify_layer
from tl_normmix.models.errors import MissingHookError, UnsupportedModelError
from tl_normmix.scopes import SCOPES, check_roles, scope_roles

__all__ = ["ModelDecomposition", "decompose_model"]


@dataclass(frozen=True)
class ModelDecomposition:
    """The block outputs of some layers split over the input tokens.

    Attributes:
        layers: the layers kept (dimension 0 of ``maps`` and ``completeness``).
        maps: ``‖D^l_ij‖`` ``[layer, batch, query, key]``: the norm of what input token ``j``
            contributes to position ``i``'s block output at layer ``l``; zero at padding.
        completeness: ``‖Σ_j D^l_ij + bias^l_i − x^l_i‖ / ‖x^l_i‖`` ``[layer, batch, pos]``
            against the cached block output; NaN at padding.
        bias_norms: ``‖bias^l_i‖`` ``[layer, batch, pos]``: what belongs to no token (b_V·W_O,
            b_O, the norms' β, the feed-forward block at its bias point).
        mask, model_name, convention, causal: as in ``MixingMaps``.
    """

    layers: tuple[int, ...]
    maps: Float[Tensor, "layer batch query_pos key_pos"]
    completeness: Float[Tensor, "layer batch pos"]
    bias_norms: Float[Tensor, "layer batch pos"]
    mask: Bool[Tensor, "batch pos"]
    model_name: str
    convention: str
    causal: bool


@torch.no_grad()
def decompose_model(
    model: Any,
    cache: Any,
    layers: int | Sequence[int] | None = None,
    *,
    attention_mask: Tensor | None = None,
    tokens: Tensor | None = None,
    quadrature_points: int | None = None,
    chunk_size: int | None = None,
    verify: bool = True,
    progress: bool = False,
) -> ModelDecomposition:
    """Carry per-input-token vectors through blocks ``0 … max(layers)`` of a cached run.

    Args:
        model: the TransformerLens model that made ``cache``.
        cache: from ``run_with_cache(tokens, names_filter=nm.hook_filter(model, "layer_n"))``.
        layers: the layers whose maps are kept (default: all); every block up to the last one
            is decomposed.
        attention_mask, tokens: the run's padding, as for ``mixing_maps``.
        quadrature_points: as for ``mixing_maps`` (None: closed forms, 32 points where gated).
        chunk_size: receivers per chunk (default: fit 256 MiB of working memory). Memory beyond
            it: the parts ``N²·d`` and the value parts ``N²·H_kv·d_head`` (float32).
        verify: the adapter's self-check on every block, and a check (first block) that the
            values are the linear map of the attention input this decomposition assumes.

    A feed-forward block that is not smooth along the path (a mixture-of-experts router that
    switches experts) leaves a completeness residual; it is reported, and carried on.
        progress: a progress bar over the blocks.
    """
    adapter = adapt(model)
    kept = adapter.check_layers(layers)
    layout = adapter.layout
    roles = scope_roles(SCOPES["layer_n"], layout) | {"v", "pattern", "attn_out", "resid_pre"}
    optional = check_roles([SCOPES["layer_n"]], layout) - roles if verify else frozenset()
    options = FFOptions(quadrature_points=quadrature_points)
    n_kept = len(kept)
    maps: Tensor | None = None
    residuals: Tensor | None = None
    bias_norms: Tensor | None = None
    mask: Tensor | None = None
    carried: Carried | None = None
    blocks = range(max(kept) + 1)
    for layer in tqdm(blocks, desc="decompose_model", unit="block", disable=not progress):
        present = {r for r in optional if adapter.in_cache(cache, r, layer)}
        try:
            t = adapter.read(cache, layer, roles | present)
        except MissingHookError as err:
            raise MissingHookError(
                err.missing,
                f"{err} decompose_model reads the hooks of 'layer_n': run the model with "
                "model.run_with_cache(tokens, names_filter=nm.hook_filter(model, 'layer_n')).",
            ) from None
        if mask is None:
            mask = resolve_mask(adapter, attention_mask, tokens, t)
            carried = initial(t["resid_pre"].masked_fill(~mask[..., None], 0.0))
        assert carried is not None
        if verify:
            verify_layer(
                t,
                mask,
                through_ff=True,
                precision=t.precision,
                model_name=adapter.spec.model_name,
                causal=adapter.spec.causal,
            )
        batch, n, d = t["resid_pre"].shape
        chunk = _chunk(chunk_size, t, batch, n, d)
        W_V, b_V = adapter.value_weights(layer)
        values, value_bias = value_parts(t, carried, W_V.to(t.device), b_V.to(t.device), chunk)
        if verify and layer == 0:  # where the parts are exact: is the value path linear?
            _check_values(values, value_bias, t.hooks["v"], mask, adapter.spec.model_name, layer)
        pattern = attention.masked_pattern(t.pattern, mask)
        carried = carry_block(t, carried, pattern, values, value_bias, mask, options, chunk)
        del values
        if layer not in kept:
            continue
        index = kept.index(layer)
        if maps is None:
            maps = t.pattern.new_empty(n_kept, batch, n, n)
            residuals = t.pattern.new_empty(n_kept, batch, n)
            bias_norms = t.pattern.new_empty(n_kept, batch, n)
        assert residuals is not None and bias_norms is not None
        maps[index] = carried.parts.norm(dim=-1).masked_fill(~mask[:, None, :], 0.0)
        target = t["resid_post"]
        scale = target.norm(dim=-1).clamp_min(torch.finfo(target.dtype).tiny)
        residual = (carried.total() - target).norm(dim=-1) / scale
        residuals[index] = residual.masked_fill(~mask, float("nan"))
        bias_norms[index] = carried.bias.norm(dim=-1).masked_fill(~mask, float("nan"))
    assert maps is not None and residuals is not None and bias_norms is not None
    assert mask is not None
    return ModelDecomposition(
        layers=tuple(kept),
        maps=maps,
        completeness=residuals,
        bias_norms=bias_norms,
        mask=mask,
        model_name=adapter.spec.model_name,
        convention=adapter.spec.convention,
        causal=adapter.spec.causal,
    )


def _chunk(chunk_size: int | None, t: Any, batch: int, n: int, d: int) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
        return chunk_size
    per_row = 4 * batch * n * (2 * hidden_width(t.mlp) + 6 * d)
    return max(1, min(n, DEFAULT_BUDGET_BYTES // per_row))


def _check_values(
    values: Tensor, bias: Tensor, cached: Tensor, mask: Tensor, model_name: str, layer: int
) -> None:
    """The value parts plus their bias rebuild the cached values (real tokens)."""
    batch, kv, n = values.shape[:3]
    d_head = bias.shape[-1]
    rebuilt = values.view(batch, kv, n, n, d_head).sum(3).transpose(1, 2) + bias
    if cached.shape != rebuilt.shape:  # [batch, kv, pos, d_head] bridges
        cached = cached.transpose(1, 2)
    error = float((rebuilt - cached)[mask].abs().amax()) if bool(mask.any()) else 0.0
    scale = float(cached[mask].abs().amax().clamp_min(1e-30)) if bool(mask.any()) else 1.0
    if error > 1e-4 * scale:
        raise UnsupportedModelError(
            f"{model_name}, layer {layer}: the values are not the linear map W_V of the attention "
            f"input this decomposition assumes (relative error {error / scale:.2g}); "
            "decompose_model cannot split them. Per-layer maps (mixing_maps) still work."
        )
