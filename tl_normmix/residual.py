"""Residual and layer-norm scopes of the attention block: pure tensor math (METHODS.md §2).

Per receiving token ``i``, the vector attributed to source ``j`` is

    F_i(x_j) = post_i( pre_i(Σ_h α^h_ij f^h(x_j)) + δ_ij x_i )

where ``pre_i`` and ``post_i`` are chains of norms linearised with the scales of the actual
inputs at ``i`` (METHODS §0): ``attnres_n`` has no norms; ``attnresln_n`` has the norm that reads
``attn_i + x_i`` in ``post`` (LN1 in post-LN, LN2 in pre-LN blocks); sandwich blocks put their
post-attention norm in ``pre``. Each linearised norm is ``z ↦ (1/s_i) γ ⊙ P z``, so a chain is
a fixed linear map ``T`` times a per-receiver scalar ``κ_i = Π 1/s_i``. Hence for ``j ≠ i``

    ‖F_i(x_j)‖ = κ_i ‖Σ_h α^h_ij T f^h_j‖,

a quadratic form over the Gram matrix of the transformed sources (no ``N×N×d`` tensor), and the
``N`` diagonal vectors ``F_i(x_i)`` are built explicitly. Mixing ratios need only ``N`` vectors:
``Σ_{j≠i} F_i(x_j) = κ_i T (attn_i − Σ_h α^h_ii f^h_i)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from tl_normmix import attention
from tl_normmix.blocks import NormSpec

__all__ = ["AttentionLayer", "NormChain", "Request", "decompose", "decomposed_norms"]


@dataclass(frozen=True)
class NormChain:
    """Linearised norms applied in order, each with its cached scale ``[batch, pos, 1]``."""

    norms: Sequence[tuple[NormSpec, Tensor]] = ()

    def __call__(self, z: Tensor, *, per_receiver: bool = True) -> Tensor:
        """Apply the chain to ``z`` ``[batch, pos, ..., d]`` (receiver scales if ``per_receiver``,
        else scale 1: the fixed map ``T``)."""
        for norm, scale in self.norms:
            s = scale.reshape(*scale.shape[:2], *([1] * (z.ndim - 2))) if per_receiver else 1.0
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


@dataclass
class AttentionLayer:
    """One layer's attention quantities shared by every norm scope (computed once per layer)."""

    pattern: Float[Tensor, "batch head_index query_pos key_pos"]  # padding already masked
    f: Float[Tensor, "batch pos head_index d_model"]  # f^h(x_j) = v^h_j W_O^h
    own: Float[Tensor, "batch pos d_model"]  # Σ_h α^h_ii f^h_i
    context: Float[Tensor, "batch pos d_model"]  # Σ_{j≠i} Σ_h α^h_ij f^h_j

    @classmethod
    def build(
        cls,
        pattern: Float[Tensor, "batch head_index query_pos key_pos"],
        v: Float[Tensor, "batch pos head_index d_head"],
        W_O: Float[Tensor, "head_index d_head d_model"],
        mixed: Float[Tensor, "batch pos d_model"] | None = None,
    ) -> AttentionLayer:
        """``mixed`` is ``Σ_j Σ_h α f`` if known (the cached attention output minus ``b_O``);
        otherwise it is computed from the pattern and values."""
        f = attention.source_vectors(v, W_O)
        own = attention.self_part(pattern, f)
        if mixed is None:
            mixed = attention.mixed_output(pattern, v, W_O)
        return cls(pattern=pattern, f=f, own=own, context=mixed - own)


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


def decompose(
    layer: AttentionLayer, requests: dict[str, Request], *, chunk_size: int = 512
) -> dict[str, tuple[Float[Tensor, "batch query_pos key_pos"], Float[Tensor, "batch query_pos"]]]:
    """``‖F_i(x_j)‖`` for all pairs and the mixing ratio ``r_i`` per request (METHODS §2).

    The off-diagonal quadratic forms of all requests are evaluated in one pass over the pattern,
    once per distinct norm chain. The ratio is
    ``‖Σ_{j≠i} F_i(x_j)‖ / (‖Σ_{j≠i} F_i(x_j)‖ + ‖F_i(x_i)‖)``.
    """
    chains: dict[tuple[int, ...], tuple[NormChain, NormChain]] = {}
    for request in requests.values():
        chains.setdefault(request.chain_key, (request.pre, request.post))
    factors = [
        attention.gram_factor(post(pre(layer.f, per_receiver=False), per_receiver=False))
        for pre, post in chains.values()
    ]
    off_diagonal = dict(
        zip(
            chains,
            attention.quadratic_norms(
                attention.by_key(layer.pattern), factors, chunk_size=chunk_size
            ),
            strict=True,
        )
    )
    out = {}
    for name, request in requests.items():
        pre, post = request.pre, request.post
        kappa = pre.kappa(layer.own) * post.kappa(layer.own)
        norms = kappa[..., None] * off_diagonal[request.chain_key]
        own = pre(layer.own)
        if request.residual is not None:
            own = own + request.residual
        self_norm = post(own).norm(dim=-1)
        context_norm = post(pre(layer.context)).norm(dim=-1)
        norms = norms.diagonal_scatter(self_norm, dim1=-2, dim2=-1)
        total = (context_norm + self_norm).clamp_min(torch.finfo(norms.dtype).tiny)
        out[name] = (norms, context_norm / total)
    return out


def decomposed_norms(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    v: Float[Tensor, "batch pos head_index d_head"],
    W_O: Float[Tensor, "head_index d_head d_model"],
    residual: Float[Tensor, "batch pos d_model"] | None,
    pre: NormChain = NormChain(),
    post: NormChain = NormChain(),
    *,
    chunk_size: int = 512,
) -> tuple[Float[Tensor, "batch query_pos key_pos"], Float[Tensor, "batch query_pos"]]:
    """One request of ``decompose``: ``(‖F_i(x_j)‖, r_i)`` (METHODS §2)."""
    layer = AttentionLayer.build(pattern, v, W_O)
    return decompose(layer, {"": Request(residual, pre, post)}, chunk_size=chunk_size)[""]
