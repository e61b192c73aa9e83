"""The per-layer engine behind every entry point: what a set of scopes reads and computes
(``MapsPlan``, from the registry), one layer's maps from its cached tensors (``compute_layer``:
each requested kernel once), and the storage that stacks the layers into a ``MixingMaps``
(``MapsBuilder``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tl_normmix import memory
from tl_normmix.decompose import attention
from tl_normmix.decompose.blocks import LayerTensors
from tl_normmix.maps.completeness import warn_if_incomplete
from tl_normmix.maps.heads import Extras, HeadMaps, LayerFactors
from tl_normmix.maps.mask import resolve_mask
from tl_normmix.maps.method import Kernel, LayerInputs, Method, check_roles
from tl_normmix.maps.result import MixingMaps
from tl_normmix.maps.scopes import resolve_options, resolve_scopes
from tl_normmix.maps.statistics import RowStatistics
from tl_normmix.models.adapter import ModelAdapter
from tl_normmix.models.checks import verify_layer
from tl_normmix.models.errors import MissingHookError

__all__ = [
    "LayerResult",
    "MapsBuilder",
    "MapsOptions",
    "MapsPlan",
    "compute_layer",
    "plan_maps",
    "roles_of",
]

#: Per-source value norms ‖f^h(x_j)‖ read these roles.
VALUE_NORM_ROLES = frozenset({"v"})


@dataclass(frozen=True)
class MapsOptions:
    """The options of the maps engine, shared by ``mixing_maps`` and ``run_mixing_maps``.

    Attributes:
        value_norms: also return ``‖f^h(x_j)‖`` per layer, head and source token.
        verify: check, per layer, the identities the maps rest on (``models.checks``) and raise
            ``VerificationError`` instead of returning maps where one fails.
        methods: the options of the requested methods, one instance per options type
            (``AltiOptions``, ``FFOptions``, ...; see ``nm.list_scopes()``); methods not given
            one use their defaults.
    """

    value_norms: bool = False
    verify: bool = True
    methods: tuple[Any, ...] = ()

    @classmethod
    def of(cls, value_norms: bool, verify: bool, methods: Any) -> MapsOptions:
        """From the entry points' arguments: ``methods`` one options instance or several."""
        if methods is None:
            methods = ()
        elif not isinstance(methods, (list, tuple)):
            methods = (methods,)
        return cls(value_norms, verify, tuple(methods))


@dataclass(frozen=True)
class MapsPlan:
    """What the maps of some scopes read and compute, per layer (one plan for every layer)."""

    methods: dict[str, Method]
    options: dict[str, Any]  # per scope: its options instance (None: it has none)
    roles: frozenset[str]  # the maps' own roles
    optional: frozenset[str]  # the self-check's, read where the cache has them
    value_norms: bool
    verify: bool

    @property
    def kernels(self) -> list[tuple[Kernel, dict[str, Method]]]:
        """The requested methods grouped by kernel, in the order of their first scope."""
        groups: dict[int, tuple[Kernel, dict[str, Method]]] = {}
        for name, method in self.methods.items():
            assert method.kernel is not None
            groups.setdefault(id(method.kernel), (method.kernel, {}))[1][name] = method
        return list(groups.values())

    @property
    def through_ff(self) -> bool:
        return any(m.check == "through_ff" for m in self.methods.values())


def plan_maps(
    adapter: ModelAdapter, scopes: str | Iterable[str], options: MapsOptions = MapsOptions()
) -> MapsPlan:
    """Resolve ``scopes`` for the adapter's layout (refusing unsupported ones with the reason)."""
    wanted = resolve_scopes(scopes)
    layout = adapter.layout
    for method in wanted:
        method.check_layout(layout)
    roles = roles_of(wanted, adapter, options.value_norms)
    return MapsPlan(
        methods={m.name: m for m in wanted},
        options=resolve_options(wanted, options.methods),
        roles=roles,
        optional=check_roles(list(wanted), layout) - roles if options.verify else frozenset(),
        value_norms=options.value_norms,
        verify=options.verify,
    )


def roles_of(methods: Iterable[Method], adapter: ModelAdapter, value_norms: bool) -> frozenset[str]:
    """The cache roles ``methods`` read in the adapter's model (plus the value norms')."""
    layout = adapter.layout
    roles = frozenset().union(*(m.roles(layout) for m in methods))
    return roles | VALUE_NORM_ROLES if value_norms else roles


@dataclass
class LayerResult:
    """Everything one layer contributes to a ``MixingMaps``."""

    maps: dict[str, Tensor]
    ratios: dict[str, Tensor]
    completeness: dict[str, Tensor]
    factors: LayerFactors
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
    t = _read(adapter, cache, layer, plan.roles | present, list(plan.methods), plan.value_norms)
    if mask is None:
        mask = resolve_mask(adapter, attention_mask, tokens, t)
    padded = not bool(mask.all())
    pattern = None
    if "pattern" in t:
        pattern = attention.masked_pattern(t.pattern, mask) if padded else t.pattern
    checked = None
    if plan.verify:
        checked = verify_layer(
            t,
            mask,
            through_ff=plan.through_ff,
            precision=t.precision,
            model_name=adapter.spec.model_name,
            causal=adapter.spec.causal,
        )
    last = layer == adapter.spec.n_layers - 1
    final = adapter.final_norm() if last else None
    inputs = LayerInputs(t, mask, pattern, plan.value_norms, _block_rows(t), last, final)
    result = LayerResult({}, {}, {}, LayerFactors(pattern, None), checked)
    for kernel, methods in plan.kernels:
        out = kernel(inputs, methods, plan.options)
        result.maps |= out.maps
        result.ratios |= out.ratios
        result.completeness |= out.completeness
        result.factors.states |= out.state
        if out.value_norms is not None and result.factors.value_norms is None:
            result.factors.value_norms = out.value_norms
    warn_if_incomplete(result.completeness, layer, t.precision)
    norms = result.factors.value_norms
    if norms is None and plan.value_norms:
        norms = attention.value_norms(t.v, t.W_O)
    if norms is not None and padded:
        norms = norms * mask[:, None, :]
    result.factors.value_norms = norms
    return result, mask


def _block_rows(t: LayerTensors) -> Any:
    """Rows per chunk of a row-chunked pass over this layer (the memory policy's cache blocks)."""
    pos = t.pos

    def rows(row_bytes: int) -> int:
        return memory.block_rows(row_bytes, pos, device=t.device)

    return rows


@dataclass
class MapsBuilder:
    """Collects ``LayerResult``s into one ``MixingMaps`` (preallocated: one copy of each map).

    ``pack_lower``: keep each layer's map as its lower triangle (diagonal included) until
    ``build`` while the model still runs — the maps of a causal model are zero above the
    diagonal, so this halves what the finished layers hold during the forward pass; ``build``
    writes the dense maps layer by layer. A map with anything above its diagonal (checked by
    counting non-zeros) is kept dense. ``keep_heads``: keep the factors of per-head maps.
    """

    plan: MapsPlan
    n_layers: int
    dtype: torch.dtype | None = None
    keep_heads: bool = True
    pack_lower: bool = False
    packed: dict[str, dict[int, Tensor]] = field(default_factory=dict)
    outputs: dict[str, Tensor] = field(default_factory=dict)
    ratios: dict[str, Tensor] = field(default_factory=dict)
    completeness: dict[str, Tensor] = field(default_factory=dict)
    checked: dict[int, dict[str, float]] = field(default_factory=dict)
    factors: list[LayerFactors] = field(default_factory=list)
    _lower: Tensor | None = None  # flat indices of the lower triangle
    _side: int = 0  # of the square maps it indexes

    def add(self, index: int, result: LayerResult, layer: int | None = None) -> None:
        for scope, layer_map in result.maps.items():
            if self.pack_lower and scope not in self.outputs:
                packed = self._pack(layer_map)
                if packed is not None:
                    self.packed.setdefault(scope, {})[index] = packed
                    continue
                self._unpack(scope)  # not triangular: this scope is kept dense from here on
            self._store(self.outputs, scope, index, layer_map, self.dtype)
        for scope, ratio in result.ratios.items():
            self._store(self.ratios, scope, index, ratio)
        for scope, residual in result.completeness.items():
            self._store(self.completeness, scope, index, residual)
        factors = result.factors
        if not self.keep_heads:  # the value norms are O(N): kept for maps.value_norms
            factors = LayerFactors(None, factors.value_norms)
        elif factors.pattern is not None and self.dtype is not None:
            factors.pattern = factors.pattern.to(self.dtype)
        self.factors.append(factors)
        if result.checked is not None and layer is not None:
            self.checked[layer] = result.checked

    def _store(
        self,
        into: dict[str, Tensor],
        scope: str,
        index: int,
        value: Tensor,
        dtype: torch.dtype | None = None,
    ) -> None:
        if scope not in into:
            into[scope] = value.new_empty(self.n_layers, *value.shape, dtype=dtype or value.dtype)
        into[scope][index] = value

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
        norms = [f.value_norms for f in self.factors if f.value_norms is not None]
        stacked = torch.stack(norms) if len(norms) == len(self.factors) and norms else None
        if stacked is not None:  # one copy: the layers' factors read views of the stack
            for index, factors in enumerate(self.factors):
                factors.value_norms = stacked[index]
        with_heads = plan.methods if self.keep_heads else {}
        names = list(plan.methods)
        return MixingMaps(
            layers=layers,
            maps={name: self.outputs[name] for name in names if name in self.outputs},
            heads=HeadMaps(with_heads, plan.options, self.factors, mask),
            ratios={name: self.ratios[name] for name in names if name in self.ratios},
            mask=mask,
            convention=adapter.spec.convention,
            model_name=adapter.spec.model_name,
            value_norms=stacked if plan.value_norms else None,
            tokens=tokens,
            str_tokens=adapter.str_tokens(tokens) if tokens is not None else None,
            completeness=self.completeness,
            causal=adapter.spec.causal,
            verification=self.checked,
            extras=Extras(with_heads, plan.options, self.factors, mask),
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
