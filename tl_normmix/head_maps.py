"""Per-head maps, built on first access from what the layers kept (a part of ``MixingMaps``).

Per-head maps are the largest outputs (``H`` times a layer map), so a ``MixingMaps`` keeps their
factors and builds them when read: ``attn_w`` is the (masked) cached pattern ``α^h_ij``, ``attn_n``
is ``α^h_ij ‖f^h(x_j)‖`` (METHODS §1), and ALTI's per-(head, source) routes with the residual's
share are recomputed from each layer's O(N·d) tensors and its pattern (METHODS §4).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor

from tl_normmix.decompose import alti, attention

__all__ = ["HeadMaps", "ResidualShare", "Routes"]


class HeadMaps(Mapping[str, Tensor]):
    """Per-head maps ``[layer, batch, head, query, key]``, built on first access.

    They are kept as their factors — the (masked) cached patterns and the value norms — because
    per-head maps are the largest outputs: ``attn_w`` is ``α^h_ij``, ``attn_n`` is
    ``α^h_ij ‖f^h(x_j)‖`` (METHODS §1).
    """

    def __init__(
        self,
        scopes: tuple[str, ...],
        patterns: list[Tensor],
        value_norms: Tensor | None,
        routes: Routes | None = None,
    ) -> None:
        self._scopes = scopes
        self._patterns = patterns
        self._value_norms = value_norms
        self._routes = routes
        self._built: dict[str, Tensor] = {}

    def __getitem__(self, scope: str) -> Tensor:
        if scope not in self._scopes:
            raise KeyError(
                f"No per-head map for {scope!r}; per-head maps computed: {list(self._scopes)}."
            )
        if scope == "alti":
            assert self._routes is not None
            return self._routes.parts()[0]
        if scope not in self._built:
            pattern = torch.stack(self._patterns)
            if scope == "attn_n":
                assert self._value_norms is not None
                pattern = attention.per_head_norms(
                    pattern.flatten(0, 1), self._value_norms.flatten(0, 1)
                ).unflatten(0, pattern.shape[:2])
            self._built[scope] = pattern
        return self._built[scope]

    def __iter__(self) -> Iterator[str]:
        return iter(self._scopes)

    def __len__(self) -> int:
        return len(self._scopes)


class Routes:
    """ALTI per (head, source) with the residual as its own part (information-flow routes,
    METHODS §4), for every computed layer: ``N²·H·d`` work per layer, so built on first access."""

    def __init__(
        self,
        inputs: list[Callable[[], alti.AltiInputs]],
        mask: Tensor,
        floor: float,
        eps: float = 0.0,
    ) -> None:
        self._inputs = inputs
        self._mask = mask
        self._floor = floor
        self._eps = eps
        self._built: tuple[Tensor, Tensor] | None = None

    def parts(self) -> tuple[Tensor, Tensor]:
        """``([layer, batch, head, query, key], [layer, batch, query])``: the heads' and the
        residual's shares."""
        if self._built is None:
            layers = [
                alti.alti_routes(rebuild(), self._mask, self._floor, self._eps)
                for rebuild in self._inputs
            ]
            self._built = (torch.stack([h for h, _ in layers]), torch.stack([r for _, r in layers]))
        return self._built


class ResidualShare(Mapping[str, Tensor]):
    """``residual_share["alti"]``: the residual part's share of each receiver (lazy)."""

    def __init__(self, routes: Routes) -> None:
        self._routes = routes

    def __getitem__(self, scope: str) -> Tensor:
        if scope != "alti":
            raise KeyError(f"A residual share exists for 'alti' only, not {scope!r}.")
        return self._routes.parts()[1]

    def __iter__(self) -> Iterator[str]:
        return iter(("alti",))

    def __len__(self) -> int:
        return 1
