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

__all__ = ["NormChain", "decomposed_norms"]


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

    def kappa(self, like: Tensor) -> Tensor:
        """``κ_i = Π 1/s_i`` as ``[batch, pos]``."""
        out = torch.ones(like.shape[:2], dtype=like.dtype, device=like.device)
        for _, scale in self.norms:
            out = out / scale[..., 0]
        return out


def decomposed_norms(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    v: Float[Tensor, "batch pos head_index d_head"],
    W_O: Float[Tensor, "head_index d_head d_model"],
    residual: Float[Tensor, "batch pos d_model"] | None,
    pre: NormChain = NormChain(),
    post: NormChain = NormChain(),
    *,
    chunk_size: int = 256,
) -> tuple[Float[Tensor, "batch query_pos key_pos"], Float[Tensor, "batch query_pos"]]:
    """``‖F_i(x_j)‖`` for all pairs and the mixing ratio ``r_i`` (METHODS §2).

    ``residual`` is ``x_i`` (None: no residual, the ``attn_n`` scope). The ratio is
    ``‖Σ_{j≠i} F_i(x_j)‖ / (‖Σ_{j≠i} F_i(x_j)‖ + ‖F_i(x_i)‖)``.
    """
    f = attention.source_vectors(v, W_O)
    transformed = post(pre(f, per_receiver=False), per_receiver=False)
    kappa = pre.kappa(pattern[:, 0, :, :1]) * post.kappa(pattern[:, 0, :, :1])
    norms = kappa[..., None] * attention.head_summed_norms(
        pattern, transformed, chunk_size=chunk_size
    )

    own = attention.self_part(pattern, f)
    context = attention.mixed_output(pattern, v, W_O) - own

    def receive(z: Tensor, with_residual: bool) -> Tensor:
        z = pre(z)
        if with_residual and residual is not None:
            z = z + residual
        return post(z)

    self_norm = receive(own, True).norm(dim=-1)
    context_norm = receive(context, False).norm(dim=-1)
    norms = norms.diagonal_scatter(self_norm, dim1=-2, dim2=-1)
    ratio = context_norm / (context_norm + self_norm).clamp_min(torch.finfo(norms.dtype).tiny)
    return norms, ratio
