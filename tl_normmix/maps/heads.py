"""Per-head maps and other per-layer products of a method, built on first access (a part of
``MixingMaps``).

Per-head maps are the largest outputs (``H`` times a layer map), so a ``MixingMaps`` keeps their
factors per layer — the masked pattern, the value norms and what each method's kernel left — and
each method builds its own from them (``Method.heads``): ``attn_w`` is ``α^h_ij``, ``attn_n`` is
``α^h_ij ‖f^h(x_j)‖``, ALTI's routes are recomputed from the layer's ``O(N·d)`` tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tl_normmix.maps.method import HeadBuilder, HeadFactors, Method

__all__ = ["Extras", "HeadMaps", "LayerFactors"]


@dataclass
class LayerFactors:
    """What one layer keeps for its per-head maps: the masked pattern, the value norms and each
    scope's kernel state."""

    pattern: Tensor | None
    value_norms: Tensor | None
    states: dict[str, Any] = field(default_factory=dict)


def _build(
    builder: HeadBuilder, scope: str, layers: list[LayerFactors], mask: Tensor, options: Any
) -> Tensor:
    return torch.stack(
        [
            builder(HeadFactors(f.pattern, f.value_norms, mask, f.states.get(scope)), options)
            for f in layers
        ]
    )


class HeadMaps(Mapping[str, Tensor]):
    """Per-head maps ``[layer, batch, head, query, key]`` of the scopes that have them, built
    from each layer's factors on first access."""

    def __init__(
        self,
        methods: Mapping[str, Method],
        options: Mapping[str, Any],
        layers: list[LayerFactors],
        mask: Tensor,
    ) -> None:
        self._methods = {n: m for n, m in methods.items() if m.heads is not None}
        self._options, self._layers, self._mask = options, layers, mask
        self._built: dict[str, Tensor] = {}

    def __getitem__(self, scope: str) -> Tensor:
        if scope not in self._methods:
            raise KeyError(
                f"No per-head map for {scope!r}; per-head maps computed: {list(self._methods)}."
            )
        if scope not in self._built:
            builder = self._methods[scope].heads
            assert builder is not None
            options = self._options.get(scope)
            self._built[scope] = _build(builder, scope, self._layers, self._mask, options)
        return self._built[scope]

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def __len__(self) -> int:
        return len(self._methods)


class Extras(Mapping[str, Mapping[str, Tensor]]):
    """``extras[scope][name]``: a method's further per-layer products, stacked over layers on
    first access (``alti``: ``residual_share`` ``[layer, batch, query]``)."""

    def __init__(
        self,
        methods: Mapping[str, Method],
        options: Mapping[str, Any],
        layers: list[LayerFactors],
        mask: Tensor,
    ) -> None:
        self._products = {
            scope: _Products(scope, dict(m.extras), options.get(scope), layers, mask)
            for scope, m in methods.items()
            if m.extras
        }

    def __getitem__(self, scope: str) -> Mapping[str, Tensor]:
        if scope not in self._products:
            raise KeyError(f"No extra products for {scope!r}; these have some: {list(self)}.")
        return self._products[scope]

    def __iter__(self) -> Iterator[str]:
        return iter(self._products)

    def __len__(self) -> int:
        return len(self._products)


class _Products(Mapping[str, Tensor]):
    def __init__(
        self,
        scope: str,
        builders: dict[str, HeadBuilder],
        options: Any,
        layers: list[LayerFactors],
        mask: Tensor,
    ) -> None:
        self._scope, self._builders, self._options = scope, builders, options
        self._layers, self._mask = layers, mask
        self._built: dict[str, Tensor] = {}

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._builders:
            raise KeyError(f"{self._scope!r} has no {name!r}; it has: {list(self._builders)}.")
        if name not in self._built:
            builder = self._builders[name]
            self._built[name] = _build(
                builder, self._scope, self._layers, self._mask, self._options
            )
        return self._built[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)
