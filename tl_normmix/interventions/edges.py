"""Token edges: ``(layer, head or all heads, receiver i, source j)``
(methods.md#interventions-on-edges).

An edge carries the term ``p_e = α^h_ij f^h(x_j)`` of the pure attention output at receiver ``i``
(summed over the layer's heads when ``head`` is None). Positions may be negative: ``-1`` is each
batch row's last real token (padding excluded), resolved when an intervention runs.

>>> import tl_normmix as nm
>>> E = nm.edges(layers=[3], heads="each", receivers=[-1], sources=[0, 1])
>>> len(E.resolve(n_layers=12, n_heads=4, pos=10))     # 1 layer × 4 heads × 1 receiver × 2 sources
8
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # maps.py is above this module in the flow; only its type is read
    from tl_normmix.maps import MixingMaps

__all__ = ["Edge", "EdgeSet", "edges"]


@dataclass(frozen=True)
class Edge:
    """One edge; ``head`` None means all heads of the layer together."""

    layer: int
    head: int | None
    receiver: int
    source: int

    def __str__(self) -> str:
        head = "all" if self.head is None else self.head
        return f"L{self.layer}.H{head} {self.receiver}←{self.source}"


Heads = None | str | int | Iterable[int]
Positions = None | int | Iterable[int]


@dataclass(frozen=True)
class EdgeSet:
    """A set of edges, either explicit (``edges``) or a product to expand against a model
    (``layers × heads × receivers × sources``; None = all)."""

    layers: tuple[int, ...] | None = None
    heads: str | tuple[int, ...] | None = None  # None: all heads together; "each"; explicit
    receivers: tuple[int, ...] | None = (-1,)
    sources: tuple[int, ...] | None = None
    explicit: tuple[Edge, ...] | None = None

    def resolve(self, n_layers: int, n_heads: int, pos: int) -> list[Edge]:
        """The concrete edges for a model of ``n_layers`` × ``n_heads`` on ``pos`` positions
        (receivers and sources stay as given: negatives are resolved per batch row)."""
        if self.explicit is not None:
            out = list(self.explicit)
        else:
            layers = range(n_layers) if self.layers is None else self.layers
            receivers = range(pos) if self.receivers is None else self.receivers
            sources = range(pos) if self.sources is None else self.sources
            if self.heads is None:
                heads: Sequence[int | None] = [None]
            elif self.heads == "each":
                heads = list(range(n_heads))
            else:
                heads = [int(h) for h in self.heads]
            out = [
                Edge(int(layer), head, int(i), int(j))
                for layer in layers
                for head in heads
                for i in receivers
                for j in sources
            ]
        for edge in out:
            _check(edge, n_layers, n_heads, pos)
        return out

    def __len__(self) -> int:
        if self.explicit is None:
            raise TypeError("An EdgeSet over 'all' of something has no length before resolve().")
        return len(self.explicit)

    def __iter__(self) -> Iterator[Edge]:
        if self.explicit is None:
            raise TypeError("Resolve the EdgeSet against a model first: E.resolve(...).")
        return iter(self.explicit)


def _check(edge: Edge, n_layers: int, n_heads: int, pos: int) -> None:
    if not 0 <= edge.layer < n_layers:
        raise IndexError(f"Edge {edge}: layer {edge.layer} out of range 0..{n_layers - 1}.")
    if edge.head is not None and not 0 <= edge.head < n_heads:
        raise IndexError(f"Edge {edge}: head {edge.head} out of range 0..{n_heads - 1}.")
    for name, value in (("receiver", edge.receiver), ("source", edge.source)):
        if not -pos <= value < pos:
            raise IndexError(f"Edge {edge}: {name} {value} out of range for {pos} positions.")


def _tuple(value: Positions) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


class _Edges:
    """``nm.edges(...)`` builds an EdgeSet; ``nm.edges.top(maps, ...)`` takes a map's largest
    cells."""

    def __call__(
        self,
        layers: Positions = None,
        heads: Heads = None,
        receivers: Positions = (-1,),
        sources: Positions = None,
    ) -> EdgeSet:
        """``layers``/``receivers``/``sources``: indices or None (all); ``heads``: None (all heads
        of the layer together), ``"each"`` (one edge per head) or head indices."""
        if isinstance(heads, str) and heads != "each":
            raise ValueError(f"heads={heads!r}: use None (all together), 'each' or head indices.")
        head_spec = heads if heads is None or isinstance(heads, str) else _tuple(heads)
        return EdgeSet(_tuple(layers), head_spec, _tuple(receivers), _tuple(sources))

    def top(
        self,
        maps: MixingMaps | Any,
        scope: str | int = "attn_n",
        k: int = 50,
        receivers: Positions = None,
    ) -> EdgeSet:
        """The ``k`` largest cells of ``maps[scope]`` (all heads together), ranked by the mean over
        the batch rows of the real cells (diagonal included); ``receivers`` restricts the rows.

        A ``LogitAttribution`` is ranked by the magnitude of its signed direct effects (scope
        ``"logit"``; ``"logit_alti"`` / ``"logit_exact"``: its tracked rows), and
        ``top(la, k)`` reads the second argument as ``k``."""
        name = scope if isinstance(scope, str) else "logit"
        if hasattr(maps, "tracked"):  # a LogitAttribution
            if isinstance(scope, int):
                k = scope
            elif scope == "attn_n":
                name = "logit"
            method = name.removeprefix("logit_") if name != "logit" else None
            attribution: Any = maps
            maps = attribution.as_maps(tracked=method)
        layer_maps = maps[name].double()  # [layer, batch, query, key]
        pair = maps.mask[:, :, None] & maps.mask[:, None, :]
        if maps.causal:
            pair = pair & torch.ones(pair.shape[-2:], dtype=torch.bool).tril()
        values = (layer_maps * pair).sum(1) / pair.sum(0).clamp_min(1)  # [layer, query, key]
        keep = pair.any(0).expand_as(values).clone()
        chosen = _tuple(receivers)
        if chosen is not None:
            rows = torch.zeros(values.shape[1], dtype=torch.bool)
            rows[list(chosen)] = True
            keep &= rows[None, :, None]
        flat = values.masked_fill(~keep, float("-inf")).flatten()
        count = min(k, int(keep.sum()))
        index = flat.topk(count).indices
        n_query, n_key = values.shape[1:]
        found = [
            Edge(
                maps.layers[int(x) // (n_query * n_key)],
                None,
                int(x) // n_key % n_query,
                int(x) % n_key,
            )
            for x in index
        ]
        return EdgeSet(explicit=tuple(found))


edges = _Edges()
