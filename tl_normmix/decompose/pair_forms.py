"""Vectors of every (source, receiver) pair kept as affine forms: pure tensor math
(methods.md#the-peers-methods, value zeroing).

Value zeroing evaluates the block's tail on ``N²`` edited attention outputs ``A_i − Δ_ij`` with
``Δ_ij = Σ_h α^h_ij f^h_j``. Every map before the feed-forward block is affine once its norm's
scale is known (methods.md#notation), and that scale is one number per pair. So after norms
``0 … k−1`` each pair vector is

    v_ij = Σ_g c^g_ij · (R^g_i − Σ_h α^h_ij S^g_hj + K^g),    c^g_ij = Π_{m ≥ born(g)} 1/s^m_ij

— groups ``g`` of a receiver vector ``R``, source vectors ``S`` and a constant ``K`` (each
optional), scaled by the norms applied after the group joined. A norm maps every vector by its
fixed linear part ``T`` (centring, ``γ``) and its bias joins as a new group. The vectors belong to
the layer (``N + N·H + 1`` of them) and are mapped once; only the scales ``s^m_ij`` belong to the
pairs. Evaluating through a matrix ``W`` (the feed-forward block's ``W_in``) maps the vectors first
and then mixes them per pair: ``N²·H·d_ff`` multiply-adds instead of the ``N²·d·d_ff`` of
``v_ij W``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from tl_normmix.decompose.blocks import NormSpec

__all__ = ["PairForm"]


@dataclass(frozen=True)
class _Group:
    born: int  # the norms from this index on scale the group
    receivers: Float[Tensor, "batch receiver d"] | None = None
    sources: Float[Tensor, "batch source head d"] | None = None  # subtracted, weighted by α
    constant: Float[Tensor, " d"] | None = None

    def plus(self, other: _Group) -> _Group:
        def add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            return b if a is None else a if b is None else a + b

        assert self.sources is None or other.sources is None
        return _Group(
            self.born,
            add(self.receivers, other.receivers),
            add(self.sources, other.sources),
            add(self.constant, other.constant),
        )

    def mapped(self, f: Callable[[Tensor], Tensor]) -> _Group:
        def m(x: Tensor | None) -> Tensor | None:
            return None if x is None else f(x)

        return _Group(self.born, m(self.receivers), m(self.sources), m(self.constant))


@dataclass(frozen=True)
class PairForm:
    """The layer's vectors of the pair form (module docstring) after ``norms``; the pairs'
    scales are passed to ``evaluate``."""

    groups: tuple[_Group, ...]
    norms: tuple[NormSpec, ...] = ()
    _mapped: dict[int, tuple[Tensor, tuple[_Group, ...]]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def removal(
        cls,
        receivers: Float[Tensor, "batch receiver d"],
        sources: Float[Tensor, "batch source head d"],
    ) -> PairForm:
        """``R_i − Σ_h α^h_ij S_hj`` for every pair."""
        return cls((_Group(0, receivers, sources),))

    def _joined(self, group: _Group) -> tuple[_Group, ...]:
        for k, g in enumerate(self.groups):
            if g.born == group.born:
                return (*self.groups[:k], g.plus(group), *self.groups[k + 1 :])
        return (*self.groups, group)

    def plus(self, receivers: Float[Tensor, "batch receiver d"]) -> PairForm:
        """The form plus a receiver vector (the residual stream joining)."""
        return PairForm(self._joined(_Group(len(self.norms), receivers=receivers)), self.norms)

    def normed(self, norm: NormSpec) -> PairForm:
        """``norm`` applied (its per-pair scale is the next one ``evaluate`` is given)."""
        groups = tuple(g.mapped(lambda x: norm.linear(x, None)) for g in self.groups)
        form = PairForm(groups, (*self.norms, norm))
        if norm.bias is None:
            return form
        return PairForm(form._joined(_Group(len(form.norms), constant=norm.bias)), form.norms)

    def evaluate(
        self,
        weights: Float[Tensor, "batch source receiver head"],
        inverse_scales: Sequence[Float[Tensor, "batch source receiver 1"] | None],
        receivers: slice,
        sources: slice,
        W: Float[Tensor, "d d_out"] | None = None,
        bias: Float[Tensor, " d_out"] | None = None,
    ) -> Float[Tensor, "batch source receiver d_out"]:
        """``v_ij W + bias`` (``W=None``: ``v_ij``) for the pairs of ``sources × receivers``, with
        ``α^h_ij`` as ``weights`` and ``1/s^m_ij`` of each norm (None: a fixed map). Two passes
        over the result: the source sums (a batched matmul over sources, the constants as its
        input, the group's scale folded into ``α``) and the scaled receiver vectors."""
        assert len(inverse_scales) == len(self.norms)
        groups = self._through(W)
        scalars = [_product(inverse_scales[g.born :]) for g in groups]
        constant = bias
        for g, c in zip(groups, scalars, strict=True):
            if c is None and g.constant is not None:
                constant = g.constant if constant is None else constant + g.constant
        (k,) = (k for k, g in enumerate(groups) if g.sources is not None)
        subtracted = groups[k].sources
        assert subtracted is not None
        scalar = scalars[k]
        scaled = weights if scalar is None else weights * scalar
        batch, n_source, n_receiver, heads = scaled.shape
        flat = scaled.reshape(batch * n_source, n_receiver, heads)
        minus = subtracted[:, sources].neg().flatten(0, 1)  # [batch·source, head, d_out]
        # the constants as the product's input: one pass over the result, not two
        out = torch.bmm(flat, minus) if constant is None else torch.baddbmm(constant, flat, minus)
        out = out.view(batch, n_source, n_receiver, -1)
        for g, c in zip(groups, scalars, strict=True):
            vectors = [] if g.receivers is None else [g.receivers[:, None, receivers]]
            if c is not None and g.constant is not None:
                vectors.append(g.constant)
            for x in vectors:
                if c is None:
                    out += x
                else:
                    out.addcmul_(c, x)
        return out

    def _through(self, W: Tensor | None) -> tuple[_Group, ...]:
        """The groups' vectors mapped by ``W`` (computed once per matrix)."""
        if W is None:
            return self.groups
        held = self._mapped.get(id(W))
        if held is None or held[0] is not W:
            held = (W, tuple(g.mapped(lambda x: x @ W) for g in self.groups))
            self._mapped[id(W)] = held
        return held[1]


def _product(factors: Sequence[Tensor | None]) -> Tensor | None:
    out: Tensor | None = None
    for f in factors:
        if f is not None:
            out = f if out is None else out * f
    return out
