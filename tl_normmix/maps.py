"""``MixingMaps``, the one result type, and ``mixing_maps``, the one engine that fills it.

Every map keeps the orientation of METHODS.md §0: ``[layer, batch, query i, key j]``, rows are
receivers. Layer maps are float32 whatever the cache dtype. Cells that involve a padded token
(query or key outside ``mask``) are zero in the maps and NaN in per-token statistics.

>>> import tl_normmix as nm  # doctest: +SKIP
>>> _, cache = model.run_with_cache(tokens, names_filter=nm.hook_filter(model, "attn_w"))
>>> maps = nm.mixing_maps(model, cache, scopes="attn_w")
>>> maps["attn_w"].shape                       # [layer, batch, query, key]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_normmix import attention, residual
from tl_normmix.adapter import LayerTensors, MissingHookError, adapt
from tl_normmix.scopes import NORM_CHAINS, SCOPES, VALUE_NORM_ROLES, resolve_scopes, scope_roles

__all__ = ["MixingMaps", "hook_filter", "mixing_maps"]


@dataclass(frozen=True)
class MixingMaps:
    """Token-to-token context-mixing maps for some layers of one batch.

    Attributes:
        layers: the model layers computed; dimension 0 of every tensor follows this order.
        maps: scope name -> ``[layer, batch, query, key]`` layer map.
        heads: scope name -> ``[layer, batch, head, query, key]`` for scopes with per-head maps.
        value_norms: ``‖f^h(x_j)‖`` as ``[layer, batch, head, key]`` (METHODS §1), if requested.
        mask: ``[batch, pos]``, True for real tokens, False for padding.
        convention: ``"raw"`` (the papers' unprocessed weights) or ``"processed"`` (folded layer
            norms, centred writing weights, value biases folded into ``b_O``).
        model_name: the model's name as TransformerLens reports it.
        tokens: token ids ``[batch, pos]`` if given.
        str_tokens: token strings per batch row if the model has a tokenizer and tokens were given.
    """

    layers: tuple[int, ...]
    maps: dict[str, Float[Tensor, "layer batch query_pos key_pos"]]
    heads: dict[str, Float[Tensor, "layer batch head_index query_pos key_pos"]]
    ratios: dict[str, Float[Tensor, "layer batch query_pos"]] = field(repr=False)
    mask: Bool[Tensor, "batch pos"]
    convention: str
    model_name: str
    value_norms: Float[Tensor, "layer batch head_index pos"] | None = None
    tokens: Int[Tensor, "batch pos"] | None = None
    str_tokens: list[list[str]] | None = field(default=None, repr=False)

    def __getitem__(self, scope: str) -> Float[Tensor, "layer batch query_pos key_pos"]:
        if scope not in self.maps:
            raise KeyError(
                f"Scope {scope!r} was not computed; these were: {', '.join(self.maps)}. "
                f"Pass scopes=(..., {scope!r}) to mixing_maps."
            )
        return self.maps[scope]

    def __contains__(self, scope: object) -> bool:
        return scope in self.maps

    @property
    def scopes(self) -> tuple[str, ...]:
        return tuple(self.maps)

    def layer_index(self, layer: int) -> int:
        """Position of model layer ``layer`` along dimension 0 of the tensors."""
        if layer not in self.layers:
            raise IndexError(f"Layer {layer} was not computed; these were: {list(self.layers)}.")
        return self.layers.index(layer)

    def mixing_ratio(self, scope: str) -> Float[Tensor, "layer batch query_pos"]:
        """Context-mixing ratio ``r_i`` per receiving token (METHODS §2); NaN at padded queries.

        Norm scopes: ``‖Σ_{j≠i} F_i(x_j)‖ / (‖Σ_{j≠i} F_i(x_j)‖ + ‖F_i(x_i)‖)``; ``attn_w``:
        ``Σ_{j≠i} ᾱ_ij``; ``attnres_w``: half of that.
        """
        self[scope]  # a clear error for scopes that were not computed
        return self.ratios[scope]


def hook_filter(
    model: Any, scopes: str | Iterable[str] = ("attn_w",), *, value_norms: bool = False
) -> Callable[[str], bool]:
    """A ``names_filter`` for ``run_with_cache`` that keeps only the hooks ``scopes`` need.

    >>> _, cache = model.run_with_cache(tokens, names_filter=hook_filter(model, "attn_w"))
    ... # doctest: +SKIP
    """
    adapter = adapt(model)
    roles = _roles(resolve_scopes(scopes), adapter.spec.block.kind, value_norms)
    names = frozenset(adapter.hook_names(roles))

    def names_filter(name: str) -> bool:
        return name in names

    names_filter.hook_names = names  # type: ignore[attr-defined]
    return names_filter


def mixing_maps(
    model: Any,
    cache: Any,
    scopes: str | Iterable[str] = ("attn_w",),
    *,
    layers: int | Sequence[int] | None = None,
    attention_mask: Tensor | None = None,
    tokens: Tensor | None = None,
    value_norms: bool = False,
) -> MixingMaps:
    """Compute the context-mixing maps of ``scopes`` from ``cache`` (METHODS.md §1–3).

    Args:
        model: the TransformerLens model that produced ``cache`` (``TransformerBridge``,
            ``HookedTransformer`` or ``HookedEncoder``).
        cache: its ``ActivationCache``, e.g. from
            ``run_with_cache(tokens, names_filter=hook_filter(model, scopes))``.
        scopes: scope names; see ``tl_normmix.SCOPES``.
        layers: a layer or layers to compute (default: all).
        attention_mask: ``[batch, pos]``, 1 for real tokens, 0 for padding (default: no padding).
        tokens: the token ids, kept in the result for labels.
        value_norms: also return ``‖f^h(x_j)‖`` per layer, head and source token.
    """
    adapter = adapt(model)
    wanted = resolve_scopes(scopes)
    layer_list = adapter.check_layers(layers)
    roles = _roles(wanted, adapter.spec.block.kind, value_norms)
    per_layer: dict[str, list[Tensor]] = {}
    per_head: dict[str, list[Tensor]] = {}
    ratios: dict[str, list[Tensor]] = {}
    norms: list[Tensor] = []
    mask: Tensor | None = None
    for layer in layer_list:
        try:
            tensors = adapter.read(cache, layer, roles)
        except MissingHookError as err:
            call = f"names_filter=nm.hook_filter(model, {tuple(s.name for s in wanted)!r}"
            call += ", value_norms=True)" if value_norms else ")"
            raise MissingHookError(
                err.missing,
                f"{err} Layer {layer} of {adapter.spec.model_name} needs them. Re-run the model "
                f"with model.run_with_cache(tokens, {call}) (import tl_normmix as nm).",
            ) from None
        if mask is None:
            mask = _mask(attention_mask, tensors.batch, tensors.pos, tensors.device)
        for scope in wanted:
            layer_map, head_maps, ratio = _SCOPE_FUNCTIONS[scope.name](tensors, mask)
            per_layer.setdefault(scope.name, []).append(_masked(layer_map, mask))
            ratios.setdefault(scope.name, []).append(ratio.masked_fill(~mask, float("nan")))
            if head_maps is not None:
                per_head.setdefault(scope.name, []).append(head_maps)
        if value_norms:
            norms.append(attention.value_norms(tensors.v, tensors.W_O) * mask[:, None, :])
    assert mask is not None
    return MixingMaps(
        layers=tuple(layer_list),
        maps={k: torch.stack(v) for k, v in per_layer.items()},
        heads={k: torch.stack(v) for k, v in per_head.items()},
        ratios={k: torch.stack(v) for k, v in ratios.items()},
        mask=mask,
        convention=adapter.spec.convention,
        model_name=adapter.spec.model_name,
        value_norms=torch.stack(norms) if value_norms else None,
        tokens=tokens,
        str_tokens=adapter.str_tokens(tokens) if tokens is not None else None,
    )


def _roles(scopes: Iterable[Any], kind: Any, value_norms: bool) -> frozenset[str]:
    roles = frozenset().union(*(scope_roles(s, kind) for s in scopes))
    return roles | VALUE_NORM_ROLES if value_norms else roles


def _mask(attention_mask: Tensor | None, batch: int, pos: int, device: torch.device) -> Tensor:
    if attention_mask is None:
        return torch.ones(batch, pos, dtype=torch.bool, device=device)
    if tuple(attention_mask.shape) != (batch, pos):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the cache holds "
            f"[batch={batch}, pos={pos}]; pass the mask used for the run that made the cache."
        )
    return attention_mask.to(device=device).bool()


def _masked(layer_map: Tensor, mask: Tensor) -> Tensor:
    return layer_map.masked_fill(~(mask[:, :, None] & mask[:, None, :]), 0.0)


def _weight_ratio(weights: Tensor) -> Tensor:
    return weights.diagonal_scatter(torch.zeros_like(weights[..., 0]), dim1=-2, dim2=-1).sum(-1)


def _attn_w(t: LayerTensors, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    heads = attention.masked_pattern(t.pattern, mask)
    layer_map = attention.head_mean(heads)
    return layer_map, heads, _weight_ratio(layer_map)


def _attnres_w(t: LayerTensors, mask: Tensor) -> tuple[Tensor, None, Tensor]:
    weights = attention.head_mean(attention.masked_pattern(t.pattern, mask))
    eye = torch.eye(weights.shape[-1], device=weights.device)
    return 0.5 * weights + 0.5 * eye, None, 0.5 * _weight_ratio(weights)


def _attn_n(t: LayerTensors, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    pattern = attention.masked_pattern(t.pattern, mask)
    layer_map, ratio = residual.decomposed_norms(pattern, t.v, t.W_O, None)
    heads = attention.per_head_norms(pattern, attention.value_norms(t.v, t.W_O))
    return layer_map, heads, ratio


def _norm_scope(name: str) -> Any:
    def compute(t: LayerTensors, mask: Tensor) -> tuple[Tensor, None, Tensor]:
        pre, post = NORM_CHAINS[(name, t.spec.kind)]

        def chain(norms: tuple[str, ...]) -> residual.NormChain:
            return residual.NormChain([(t.norms[n], t[f"{n}.scale"]) for n in norms])

        pattern = attention.masked_pattern(t.pattern, mask)
        layer_map, ratio = residual.decomposed_norms(
            pattern, t.v, t.W_O, t["resid_pre"], chain(pre), chain(post)
        )
        return layer_map, None, ratio

    return compute


_SCOPE_FUNCTIONS = {
    "attn_w": _attn_w,
    "attn_n": _attn_n,
    "attnres_w": _attnres_w,
    "attnres_n": _norm_scope("attnres_n"),
    "attnresln_n": _norm_scope("attnresln_n"),
}
assert set(_SCOPE_FUNCTIONS) == set(SCOPES)
