"""The per-layer engine behind every entry point: what a set of scopes reads and computes
(``MapsPlan``), one layer's maps from its cached tensors (``compute_layer``), the run's padding mask
(``resolve_mask``) and the storage that stacks the layers into a ``MixingMaps`` (``MapsBuilder``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tl_normmix.decompose import alti
from tl_normmix.decompose.attention_block import ATTENTION_STAGES, layer_maps, mask_padding
from tl_normmix.decompose.blocks import LayerTensors, Stage
from tl_normmix.decompose.whole_layer import WHOLE_LAYER_STAGES, FFOptions, whole_layer_maps
from tl_normmix.head_maps import HeadMaps, ResidualShare, Routes
from tl_normmix.maps import MixingMaps
from tl_normmix.models.adapter import ModelAdapter
from tl_normmix.models.checks import verify_layer
from tl_normmix.models.errors import MissingHookError
from tl_normmix.row_statistics import RowStatistics
from tl_normmix.scopes import (
    VALUE_NORM_ROLES,
    Scope,
    check_roles,
    resolve_scopes,
    scope_roles,
    stage_of,
)

__all__ = [
    "LayerResult",
    "MapsBuilder",
    "MapsPlan",
    "compute_layer",
    "plan_maps",
    "resolve_mask",
    "roles_of",
]


@dataclass(frozen=True)
class MapsPlan:
    """What the maps of ``scopes`` read and compute, per layer (one plan for every layer)."""

    scopes: tuple[Scope, ...]
    stages: dict[str, Stage]
    roles: frozenset[str]  # the maps' own roles
    optional: frozenset[str]  # the self-check's, read where the cache has them
    options: FFOptions
    value_norms: bool
    verify: bool
    alti_floor: float = 0.0
    alti_eps: float = 0.0
    alti_value_bias: str = "source"

    @property
    def attention_stages(self) -> dict[str, Stage]:
        return {n: s for n, s in self.stages.items() if s in ATTENTION_STAGES}

    @property
    def whole(self) -> dict[str, Stage]:
        return {n: s for n, s in self.stages.items() if s in WHOLE_LAYER_STAGES}

    @property
    def through_ff(self) -> bool:
        return bool(self.whole) or Stage.GLOBENC in self.stages.values()


def plan_maps(
    adapter: ModelAdapter,
    scopes: str | Iterable[str],
    *,
    value_norms: bool = False,
    verify: bool = True,
    quadrature_points: int | None = None,
    chunk_size: int | None = None,
    alti_floor: float = 0.0,
    alti_eps: float = 0.0,
    alti_value_bias: str = "source",
) -> MapsPlan:
    """Resolve ``scopes`` for the adapter's layout (refusing unsupported ones with the reason)."""
    if alti_value_bias not in ("source", "bias"):
        raise ValueError(f"alti_value_bias must be 'source' or 'bias', got {alti_value_bias!r}.")
    wanted = resolve_scopes(scopes)
    layout = adapter.layout
    roles = roles_of(wanted, adapter, value_norms)
    return MapsPlan(
        scopes=wanted,
        stages={s.name: stage_of(s, layout) for s in wanted},
        roles=roles,
        optional=check_roles(wanted, layout) - roles if verify else frozenset(),
        options=FFOptions(quadrature_points=quadrature_points, chunk_size=chunk_size),
        value_norms=value_norms,
        verify=verify,
        alti_floor=alti_floor,
        alti_eps=alti_eps,
        alti_value_bias=alti_value_bias,
    )


@dataclass
class LayerResult:
    """Everything one layer contributes to a ``MixingMaps``."""

    maps: dict[str, Tensor]
    ratios: dict[str, Tensor]
    completeness: dict[str, Tensor]
    pattern: Tensor | None
    value_norms: Tensor | None
    routes: Callable[[], alti.AltiInputs] | None
    checked: dict[str, float] | None


def compute_layer(
    adapter: ModelAdapter,
    plan: MapsPlan,
    cache: Any,
    layer: int,
    mask: Tensor | None,
    attention_mask: Tensor | None = None,
    tokens: Tensor | None = None,
) -> tuple[LayerResult, Tensor]:
    """The maps of one layer from ``cache`` (anything indexable by hook name) and the run's
    padding mask (resolved on the first layer when ``mask`` is None)."""
    present = {r for r in plan.optional if adapter.in_cache(cache, r, layer)}
    names = [s.name for s in plan.scopes]
    tensors = _read(adapter, cache, layer, plan.roles | present, names, plan.value_norms)
    if mask is None:
        mask = resolve_mask(adapter, attention_mask, tokens, tensors)
    result = layer_maps(
        tensors,
        mask,
        plan.attention_stages,
        plan.value_norms,
        alti_eps=plan.alti_eps,
        alti_fold_value_bias=plan.alti_value_bias == "bias",
    )
    checked = None
    if plan.verify:  # after the attention-block maps, whose tensors are still in the CPU cache
        checked = verify_layer(
            tensors,
            mask,
            through_ff=plan.through_ff,
            precision=tensors.precision,
            model_name=adapter.spec.model_name,
            causal=adapter.spec.causal,
        )
    completeness: dict[str, Tensor] = {}
    if plan.whole:
        assert result.pattern is not None
        extra = whole_layer_maps(tensors, result.pattern, mask, plan.whole, plan.options)
        mask_padding(extra.maps, extra.ratios, mask)  # idempotent where stages share one
        result.maps |= extra.maps
        result.ratios |= extra.ratios
        completeness = {
            scope: residual.masked_fill(~mask, float("nan"))
            for scope, residual in extra.completeness.items()
        }
    out = LayerResult(
        maps=result.maps,
        ratios=result.ratios,
        completeness=completeness,
        pattern=result.pattern,
        value_norms=result.value_norms,
        routes=result.routes,
        checked=checked,
    )
    return out, mask


class MapsBuilder:
    """Collects ``LayerResult``s into one ``MixingMaps`` (preallocated: one copy of each map).

    ``pack_lower``: keep each layer's map as its lower triangle (diagonal included) until
    ``build`` while the model still runs — the maps of a causal model are zero above the
    diagonal, so this halves what the finished layers hold during the forward pass; ``build``
    writes the dense maps layer by layer. A map with anything above its diagonal (checked by
    counting non-zeros) is kept dense.
    """

    def __init__(
        self,
        plan: MapsPlan,
        n_layers: int,
        *,
        dtype: torch.dtype | None = None,
        keep_heads: bool = True,
        pack_lower: bool = False,
    ) -> None:
        self.plan = plan
        self.n_layers = n_layers
        self.dtype = dtype
        self.keep_heads = keep_heads
        self.pack_lower = pack_lower
        self.packed: dict[str, dict[int, Tensor]] = {}
        self._lower: Tensor | None = None  # flat indices of the lower triangle
        self._side = 0  # of the square maps it indexes
        self.outputs: dict[str, Tensor] = {}
        self.ratios: dict[str, Tensor] = {}
        self.completeness: dict[str, Tensor] = {}
        self.checked: dict[int, dict[str, float]] = {}
        self.patterns: list[Tensor] = []
        self.norms: list[Tensor] = []
        self.routes: list[Callable[[], alti.AltiInputs]] = []
        self.layers: list[int] = []

    def add(self, index: int, result: LayerResult, layer: int | None = None) -> None:
        n = self.n_layers
        for scope, layer_map in result.maps.items():
            if self.pack_lower and scope not in self.outputs:
                packed = self._pack(layer_map)
                if packed is not None:
                    self.packed.setdefault(scope, {})[index] = packed
                    continue
                self._unpack(scope)  # not triangular: this scope is kept dense from here on
            if scope not in self.outputs:
                dtype = self.dtype or layer_map.dtype
                self.outputs[scope] = layer_map.new_empty(n, *layer_map.shape, dtype=dtype)
            self.outputs[scope][index] = layer_map
        for scope, ratio in result.ratios.items():
            if scope not in self.ratios:
                self.ratios[scope] = ratio.new_empty(n, *ratio.shape)
            self.ratios[scope][index] = ratio
        for scope, residual in result.completeness.items():
            if scope not in self.completeness:
                self.completeness[scope] = residual.new_empty(n, *residual.shape)
            self.completeness[scope][index] = residual
        if result.pattern is not None and self.keep_heads:
            pattern = result.pattern
            self.patterns.append(pattern.to(self.dtype) if self.dtype is not None else pattern)
        if result.value_norms is not None:
            self.norms.append(result.value_norms)
        if result.routes is not None and self.keep_heads:
            self.routes.append(result.routes)
        if result.checked is not None and layer is not None:
            self.checked[layer] = result.checked

    def build(
        self,
        adapter: ModelAdapter,
        layers: tuple[int, ...],
        mask: Tensor,
        tokens: Tensor | None,
        stats: dict[str, RowStatistics] | None = None,
    ) -> MixingMaps:
        """The ``MixingMaps`` of the layers added (``stats``: per-receiver statistics kept
        instead of maps, ``run_mixing_maps(keep="stats")``)."""
        plan = self.plan
        for scope in list(self.packed):
            self._unpack(scope)
        stacked_norms = torch.stack(self.norms) if self.norms else None
        names = [s.name for s in plan.scopes]
        has_alti = any(s is Stage.ALTI for s in plan.stages.values())
        lazy_routes = (
            Routes(self.routes, mask, plan.alti_floor, plan.alti_eps) if self.routes else None
        )
        with_heads = tuple(s.name for s in plan.scopes if s.has_heads) if self.keep_heads else ()
        return MixingMaps(
            layers=layers,
            maps={name: self.outputs[name] for name in names if name in self.outputs},
            heads=HeadMaps(with_heads, self.patterns, stacked_norms, lazy_routes),
            ratios={name: self.ratios[name] for name in names},
            mask=mask,
            convention=adapter.spec.convention,
            model_name=adapter.spec.model_name,
            value_norms=stacked_norms if plan.value_norms else None,
            tokens=tokens,
            str_tokens=adapter.str_tokens(tokens) if tokens is not None else None,
            completeness={name: self.completeness[name] for name in plan.whole},
            causal=adapter.spec.causal,
            verification=self.checked,
            residual_share=ResidualShare(lazy_routes) if has_alti and lazy_routes else {},
            stats=stats or {},
        )

    def _pack(self, layer_map: Tensor) -> Tensor | None:
        """The lower triangle of ``layer_map`` ``[batch, q, k]`` (q = k), or None when it has
        anything above the diagonal."""
        batch, n_q, n_k = layer_map.shape
        if n_q != n_k:
            return None
        if self._lower is None or self._side != n_q or self._lower.device != layer_map.device:
            rows, cols = torch.tril_indices(n_q, n_k, device=layer_map.device)
            self._lower, self._side = rows * n_k + cols, n_q
        packed = layer_map.reshape(batch, n_q * n_k)[:, self._lower]
        if int((packed != 0).sum()) != int((layer_map != 0).sum()):
            return None
        return packed.to(self.dtype) if self.dtype is not None else packed

    def _unpack(self, scope: str) -> None:
        """Write ``scope``'s packed layers into its dense maps, freeing each as it goes."""
        layers = self.packed.pop(scope, {})
        if not layers:
            return
        assert self._lower is not None
        first = next(iter(layers.values()))
        batch = first.shape[0]
        n = self._side
        if scope not in self.outputs:
            self.outputs[scope] = first.new_empty(self.n_layers, batch, n, n)
        dense = self.outputs[scope]
        for index in sorted(layers):
            flat = dense[index].view(batch, n * n)
            flat.zero_()
            flat[:, self._lower] = layers.pop(index)


def _read(
    adapter: ModelAdapter,
    cache: Any,
    layer: int,
    roles: frozenset[str] | set[str],
    scopes: list[str],
    value_norms: bool,
) -> LayerTensors:
    try:
        return adapter.read(cache, layer, roles)
    except MissingHookError as err:
        call = f"names_filter=nm.hook_filter(model, {tuple(scopes)!r}"
        call += ", value_norms=True)" if value_norms else ")"
        raise MissingHookError(
            err.missing,
            f"{err} Layer {layer} of {adapter.spec.model_name} needs them. Re-run the model "
            f"with model.run_with_cache(tokens, {call}) (import tl_normmix as nm).",
        ) from None


def roles_of(scopes: Iterable[Scope], adapter: ModelAdapter, value_norms: bool) -> frozenset[str]:
    layout = adapter.layout
    roles = frozenset().union(*(scope_roles(s, layout) for s in scopes))
    return roles | VALUE_NORM_ROLES if value_norms else roles


def resolve_mask(
    adapter: ModelAdapter, attention_mask: Tensor | None, tokens: Tensor | None, t: LayerTensors
) -> Tensor:
    """The padding mask of a run ``[batch, pos]``: given, derived from ``tokens`` as
    TransformerLens does, or all ones (refused where the pattern shows masked padding)."""
    batch, pos, device = t.batch, t.pos, t.device
    if tokens is not None:
        rows = tokens if tokens.ndim == 2 else tokens[None]
        if tuple(rows.shape) != (batch, pos):
            raise ValueError(
                f"tokens has shape {tuple(rows.shape)} but the cache holds [batch={batch}, "
                f"pos={pos}]: pass the tokens of the run that made the cache."
            )
    if attention_mask is None:
        derived = adapter.padding_mask(tokens) if tokens is not None else None
        if derived is not None:
            return derived.to(device=device).bool()
        if "pattern" in t:
            _refuse_hidden_padding(t.pattern, adapter.spec.causal)
        return torch.ones(batch, pos, dtype=torch.bool, device=device)
    if tuple(attention_mask.shape) != (batch, pos):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the cache holds "
            f"[batch={batch}, pos={pos}]; pass the mask used for the run that made the cache."
        )
    return attention_mask.to(device=device).bool()


def _refuse_hidden_padding(pattern: Tensor, causal: bool) -> None:
    """Padding the model masked, which the maps would count as tokens unless the mask is given:
    a key that no query attends to in any head (encoders, masked right padding), or — in a causal
    model — a first position that attends to later ones (left padding: fully masked rows)."""
    unseen = (pattern == 0).all(dim=1).all(dim=1).any(dim=-1)  # [batch]
    if causal and pattern.shape[-1] > 1:
        unseen |= (pattern[:, :, 0, 1:] != 0).any(dim=-1).any(dim=-1)
    if bool(unseen.any()):
        rows = [int(b) for b in unseen.nonzero()[:, 0]]
        raise ValueError(
            f"Batch row(s) {rows} of the cache look padded and masked (a key no query attends to, "
            "or a first position that attends to later ones). Pass the mask the run used, "
            "mixing_maps(..., attention_mask=mask), or the tokens (tokens=...) so tl_normmix can "
            "derive it as TransformerLens did."
        )
