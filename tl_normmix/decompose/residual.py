"""Residual and layer-norm scopes of the attention block: pure tensor math
(methods.md#residual-and-layer-norm).

Per receiving token ``i``, the vector attributed to source ``j`` is

    F_i(x_j) = post_i( pre_i(Σ_h α^h_ij f^h(x_j)) + δ_ij x_i )

where ``pre_i`` and ``post_i`` are chains of norms linearised with the scales of the actual inputs
at ``i`` (methods.md#notation): ``attnres_n`` has no norms; ``attnresln_n`` has the norm that reads
``attn_i + x_i`` in ``post`` (LN1 in post-LN, LN2 in pre-LN blocks); sandwich blocks put their
post-attention norm in ``pre``. Each linearised norm is ``z ↦ (1/s_i) γ ⊙ P z``, so a chain is a
fixed linear map ``T`` times a per-receiver scalar ``κ_i = Π 1/s_i``. Hence for ``j ≠ i``

    ‖F_i(x_j)‖ = κ_i ‖Σ_h α^h_ij T f^h_j‖,

a quadratic form over the Gram matrix of the transformed sources (no ``N×N×d`` tensor), and the
``N`` diagonal vectors ``F_i(x_i)`` are built explicitly. Mixing ratios need only ``N`` vectors:
``Σ_{j≠i} F_i(x_j) = κ_i T (attn_i − Σ_h α^h_ii f^h_i)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from tl_normmix.decompose import attention
from tl_normmix.decompose.blocks import NormSpec

__all__ = [
    "Decomposition",
    "NormChain",
    "Request",
    "decompose",
    "decomposed_norms",
    "through_bias",
]


@dataclass(frozen=True)
class NormChain:
    """Linearised norms applied in order, each with its cached scale ``[batch, pos, 1]``."""

    norms: Sequence[tuple[NormSpec, Tensor]] = ()

    def __call__(self, z: Tensor, *, per_receiver: bool = True) -> Tensor:
        """Apply the chain to ``z`` ``[batch, pos, ..., d]`` with the receivers' scales, or, if not
        ``per_receiver``, without them (the fixed linear map ``T``)."""
        for norm, scale in self.norms:
            s = scale.reshape(*scale.shape[:2], *([1] * (z.ndim - 2))) if per_receiver else None
            z = norm.linear(z, s)
        return z

    @property
    def key(self) -> tuple[int, ...]:
        """Identifies the chain within one computation (the same norms and scale tensors)."""
        return tuple(id(part) for pair in self.norms for part in pair)

    def kappa(self, like: Tensor) -> Tensor:
        """``κ_i = Π 1/s_i`` as ``[batch, pos]``."""
        out = torch.ones(like.shape[:2], dtype=like.dtype, device=like.device)
        for _, scale in self.norms:
            out = out / scale[..., 0]
        return out


def through_bias(chain: NormChain, b: Tensor) -> Tensor:
    """A bias term ``b`` through the chain's norms with their cached scales (``β`` included)."""
    for norm, scale in chain.norms:
        b = norm.apply(b, scale)
    return b


@dataclass(frozen=True)
class Request:
    """One scope's decomposition: residual ``x_i`` (None: none) and the norm chains."""

    residual: Tensor | None = None
    pre: NormChain = NormChain()
    post: NormChain = NormChain()

    @property
    def chain_key(self) -> tuple[int, ...]:
        """Requests with equal keys share their off-diagonal quadratic form."""
        return (*self.pre.key, -1, *self.post.key)

    def transform(self) -> Callable[[Tensor], Tensor] | None:
        """The fixed linear map ``T`` of both chains (None when there are no norms)."""
        if not self.pre.norms and not self.post.norms:
            return None
        pre, post = self.pre, self.post
        return lambda f: post(pre(f, per_receiver=False), per_receiver=False)


PairNorms = Float[Tensor, "batch query_pos key_pos"]
Ratios = Float[Tensor, "batch query_pos"]


@dataclass
class Decomposition:
    """``(‖F_i(x_j)‖ [batch, query, key], r_i [batch, query])`` per request, and the value norms
    ``‖f^h_j‖`` ``[batch, head, key]`` that came for free."""

    maps: dict[str, tuple[PairNorms, Ratios]]
    value_norms: Float[Tensor, "batch head_index pos"]


def decompose(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    v: Float[Tensor, "batch pos head_index d_head"],
    W_O: Float[Tensor, "head_index d_head d_model"],
    requests: dict[str, Request],
    *,
    mixed: Float[Tensor, "batch pos d_model"] | None = None,
    chunk_size: int | None = None,
) -> Decomposition:
    """``‖F_i(x_j)‖`` for all pairs and the mixing ratio ``r_i`` per request
    (methods.md#residual-and-layer-norm).

    ``pattern`` has padding already masked; ``mixed`` is ``Σ_j Σ_h α f`` if known (the cached
    attention output minus ``b_O``), else it is computed. One chunked pass over the sources
    builds a Gram factor per distinct norm chain; one chunked pass over the queries evaluates
    every chain's quadratic form (``chunk_size`` rows at a time: a query row holds
    ``batch · N · H · (1 + n_chains)`` floats; None: all at once). The ratio is
    ``‖Σ_{j≠i} F_i(x_j)‖ / (‖Σ_{j≠i} F_i(x_j)‖ + ‖F_i(x_i)‖)``.
    """
    chains: dict[tuple[int, ...], Request] = {}
    for request in requests.values():
        chains.setdefault(request.chain_key, request)
    terms = attention.source_terms(
        pattern, v, W_O, [r.transform() for r in chains.values()], chunk_size=chunk_size
    )
    quadratic = attention.quadratic_norms(pattern, terms.factors, chunk_size=chunk_size)
    off_diagonal = dict(zip(chains, quadratic, strict=True))
    if mixed is None:
        mixed = attention.mixed_output(pattern, v, W_O)
    context = mixed - terms.own
    out = {}
    for name, request in requests.items():
        pre, post = request.pre, request.post
        kappa = pre.kappa(terms.own) * post.kappa(terms.own)
        norms = off_diagonal[request.chain_key] * kappa[..., None]
        own = pre(terms.own)
        if request.residual is not None:
            own = own + request.residual
        self_norm = post(own).norm(dim=-1)
        context_norm = post(pre(context)).norm(dim=-1)
        norms.diagonal(dim1=-2, dim2=-1).copy_(self_norm)
        total = (context_norm + self_norm).clamp_min(torch.finfo(norms.dtype).tiny)
        out[name] = (norms, context_norm / total)
    return Decomposition(maps=out, value_norms=terms.value_norms)


def decomposed_norms(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    v: Float[Tensor, "batch pos head_index d_head"],
    W_O: Float[Tensor, "head_index d_head d_model"],
    residual: Float[Tensor, "batch pos d_model"] | None,
    pre: NormChain = NormChain(),
    post: NormChain = NormChain(),
    *,
    chunk_size: int | None = None,
) -> tuple[Float[Tensor, "batch query_pos key_pos"], Float[Tensor, "batch query_pos"]]:
    """One request of ``decompose``: ``(‖F_i(x_j)‖, r_i)`` (methods.md#residual-and-layer-norm)."""
    requests = {"": Request(residual, pre, post)}
    return decompose(pattern, v, W_O, requests, chunk_size=chunk_size).maps[""]
