"""``decompose_model``: per-input-token vectors carried through every block
(methods.md#the-peers-methods).

The exact counterpart of DecompX (Modarressi et al. 2023): the block outputs of a cached run are
split over the input tokens, ``x^l_i = Σ_j D^l_ij + bias^l_i``, through attention (with the real
attention weights), norms (frozen scales) and feed-forward blocks (integrated gradients along the
decomposed input, methods.md#the-feed-forward-block) — no linearisation of the activation. ``maps``
holds ``‖D^l_ij‖``; ``completeness`` the relative residual of ``Σ_j D^l_ij + bias^l_i`` against the
cached block output.

>>> _, cache = model.run_with_cache(tokens, names_filter=nm.hook_filter(model, "layer_n"))
... # doctest: +SKIP
>>> dm = nm.decompose_model(model, cache)
>>> dm.maps[-1, 0, -1]            # how much of the last token's final state each input token wrote
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_normmix import memory
from tl_normmix.decompose import attention
from tl_normmix.decompose.blocks import LayerTensors
from tl_normmix.decompose.carried import Carried, carry_block, initial, value_parts
from tl_normmix.decompose.whole_layer import hidden_width
from tl_normmix.maps.completeness import warn_if_incomplete
from tl_normmix.maps.mask import resolve_mask
from tl_normmix.maps.method import check_roles
from tl_normmix.maps.scopes import SCOPES
from tl_normmix.models.adapter import adapt
from tl_normmix.models.checks import verify_layer
from tl_normmix.models.errors import MissingHookError, UnsupportedModelError

__all__ = ["ModelDecomposition", "carried_blocks", "decompose_model", "read_layer"]


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
    progress: bool = True,
) -> ModelDecomposition:
    """Carry per-input-token vectors through blocks ``0 … max(layers)`` of a cached run.

    Args:
        model: the TransformerLens model that made ``cache``.
        cache: from ``run_with_cache(tokens, names_filter=nm.hook_filter(model, "layer_n"))``.
        layers: the layers whose maps are kept (default: all); every block up to the last one
            is decomposed.
        attention_mask: the run's padding, as for ``mixing_maps``.
        tokens: the run's tokens, as for ``mixing_maps``.
        quadrature_points: as for ``mixing_maps`` (None: closed forms, 32 points where gated).
        chunk_size: receivers per chunk (default: as many as fill the memory budget,
            ``tl_normmix.memory``). Memory beyond it: the parts ``N²·d`` and the value parts
            ``N²·H_kv·d_head`` (float32).
        verify: the adapter's self-check on every block, and a check (first block) that the
            values are the linear map of the attention input this decomposition assumes.
        progress: a progress bar over the blocks.

    A feed-forward block split by integrated gradients that is not smooth along the path (a
    router that does not read its input linearly) leaves a completeness residual: it is
    reported in ``completeness``, warned about (``CompletenessWarning``), and carried on.
    """
    adapter = adapt(model)
    kept = adapter.check_layers(layers)
    out = _Kept(len(kept))
    mask: Tensor | None = None
    blocks = carried_blocks(
        model,
        cache,
        max(kept),
        attention_mask=attention_mask,
        tokens=tokens,
        quadrature_points=quadrature_points,
        chunk_size=chunk_size,
        verify=verify,
        progress=progress,
    )
    for layer, t, carried, mask in blocks:
        if layer in kept:
            out.add(kept.index(layer), carried, t["resid_post"], mask)
            residuals = {"decompose_model": out.residuals[kept.index(layer)]}
            warn_if_incomplete(residuals, layer, t.precision)
    assert mask is not None
    return ModelDecomposition(
        layers=tuple(kept),
        maps=out.maps,
        completeness=out.residuals,
        bias_norms=out.bias_norms,
        mask=mask,
        model_name=adapter.spec.model_name,
        convention=adapter.spec.convention,
        causal=adapter.spec.causal,
    )


def carried_blocks(
    model: Any,
    cache: Any,
    last: int,
    *,
    attention_mask: Tensor | None = None,
    tokens: Tensor | None = None,
    quadrature_points: int | None = None,
    chunk_size: int | None = None,
    verify: bool = True,
    progress: bool = True,
) -> Iterator[tuple[int, LayerTensors, Carried, Tensor]]:
    """Blocks ``0 … last`` of a cached run, each yielded as ``(layer, tensors, carried, mask)``
    once its output is split over the input tokens (arguments as for ``decompose_model``)."""
    adapter = adapt(model)
    whole = SCOPES["layer_n"]
    roles = whole.roles(adapter.layout) | {"v", "pattern", "attn_out", "resid_pre"}
    optional = check_roles([whole], adapter.layout) - roles if verify else frozenset()
    mask: Tensor | None = None
    carried: Carried | None = None
    for layer in tqdm(range(last + 1), desc="decompose_model", unit="block", disable=not progress):
        t = read_layer(
            adapter,
            cache,
            layer,
            roles | {r for r in optional if adapter.in_cache(cache, r, layer)},
        )
        if mask is None:
            mask = resolve_mask(adapter, attention_mask, tokens, t)
            carried = initial(t["resid_pre"].masked_fill(~mask[..., None], 0.0))
        assert carried is not None
        if verify:
            spec = adapter.spec
            verify_layer(
                t,
                mask,
                through_ff=True,
                precision=t.precision,
                model_name=spec.model_name,
                causal=spec.causal,
            )
        chunk = _chunk(chunk_size, t)
        W_V, b_V = adapter.value_weights(layer)
        values, value_bias = value_parts(t, carried, W_V.to(t.device), b_V.to(t.device), chunk)
        if verify and layer == 0:  # where the parts are exact: is the value path linear?
            _check_values(values, value_bias, t.hooks["v"], mask, adapter.spec.model_name, layer)
        pattern = attention.masked_pattern(t.pattern, mask)
        carried = carry_block(
            t, carried, pattern, values, value_bias, mask, quadrature_points, chunk
        )
        del values
        yield layer, t, carried, mask


class _Kept:
    """The kept layers' maps, completeness residuals and bias norms, filled as blocks finish."""

    def __init__(self, n_kept: int) -> None:
        self.n_kept = n_kept
        self._maps: Tensor | None = None
        self._residuals: Tensor | None = None
        self._bias_norms: Tensor | None = None

    def add(self, index: int, carried: Carried, target: Tensor, mask: Tensor) -> None:
        batch, n, _ = target.shape
        if self._maps is None:
            self._maps = target.new_empty(self.n_kept, batch, n, n)
            self._residuals = target.new_empty(self.n_kept, batch, n)
            self._bias_norms = target.new_empty(self.n_kept, batch, n)
        assert self._residuals is not None and self._bias_norms is not None
        self._maps[index] = carried.parts.norm(dim=-1).masked_fill(~mask[:, None, :], 0.0)
        scale = target.norm(dim=-1).clamp_min(torch.finfo(target.dtype).tiny)
        residual = (carried.total() - target).norm(dim=-1) / scale
        self._residuals[index] = residual.masked_fill(~mask, float("nan"))
        self._bias_norms[index] = carried.bias.norm(dim=-1).masked_fill(~mask, float("nan"))

    @property
    def maps(self) -> Tensor:
        assert self._maps is not None
        return self._maps

    @property
    def residuals(self) -> Tensor:
        assert self._residuals is not None
        return self._residuals

    @property
    def bias_norms(self) -> Tensor:
        assert self._bias_norms is not None
        return self._bias_norms


def read_layer(
    adapter: Any,
    cache: Any,
    layer: int,
    roles: frozenset[str] | set[str],
    caller: str = "decompose_model",
) -> LayerTensors:
    """``adapter.read`` for the computations that read the hooks of ``layer_n``
    (``decompose_model``, ``logit_attribution``, ``router_attribution``): a missing hook says how
    to cache them."""
    try:
        return adapter.read(cache, layer, roles)
    except MissingHookError as err:
        raise MissingHookError(
            err.missing,
            f"{err} {caller} reads the hooks of 'layer_n': run the model with "
            "model.run_with_cache(tokens, names_filter=nm.hook_filter(model, 'layer_n')).",
        ) from None


def _chunk(chunk_size: int | None, t: Any) -> int:
    """Receivers per chunk: each holds its parts through the block (``N·d``), the feed-forward
    hidden units of its pairs and a few more ``N·d`` buffers."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
        return chunk_size
    batch, n, d = t["resid_pre"].shape
    per_row = 4 * batch * n * (2 * hidden_width(t.mlp) + 6 * d)
    # several chunks: each stops at the last source that reaches its receivers (causal models)
    return memory.rows_per_chunk(per_row, n, chunks=8, what=f"decompose_model layer {t.layer}")


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
