"""A linear readout pulled back through frozen norms: pure tensor math
(methods.md#signed-attribution-to-a-target).

A readout ``q = z · ρ`` of a stream ``z`` at one position is linear in every part of the stream once
each norm on the way is frozen at the scale of its real input there (methods.md#notation). A norm
``g(z) = γ ⊙ P z / s + β`` (``P`` centres for LayerNorm, is the identity for RMSNorm; ``s = 1`` for
a fixed map) gives

    g(z) · ρ = z · (P (γ ⊙ ρ) / s) + β · ρ,

so ``ρ`` is carried backward as ``P(γ ⊙ ρ)/s`` (``P`` is symmetric) and ``β · ρ`` is a part that
belongs to no token. A chain of norms is pulled back in reverse order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tl_normmix.decompose.blocks import NormSpec

__all__ = ["head_source_terms", "pull_back", "pull_back_chain"]


def pull_back(
    norm: NormSpec, scale: Float[Tensor, "*batch 1"], rho: Float[Tensor, "*batch d_model"]
) -> tuple[Float[Tensor, "*batch d_model"], Float[Tensor, " *batch"]]:
    """``(P(γ ⊙ ρ)/s, β · ρ)``: the readout of the norm's input, and its bias's share."""
    bias = rho @ norm.bias if norm.bias is not None else rho.new_zeros(rho.shape[:-1])
    out = norm.weight * rho
    if norm.kind == "layernorm":
        out = out - out.mean(-1, keepdim=True)
    return out / scale, bias


def pull_back_chain(
    chain: Sequence[tuple[NormSpec, Tensor]], rho: Float[Tensor, "*batch d_model"]
) -> tuple[Float[Tensor, "*batch d_model"], Float[Tensor, " *batch"]]:
    """A chain of norms applied in order (each with the scale of its input at the readout's
    position), pulled back: the readout of the chain's input and the sum of its biases' shares."""
    bias = rho.new_zeros(rho.shape[:-1])
    for norm, scale in reversed(chain):
        rho, share = pull_back(norm, scale, rho)
        bias = bias + share
    return rho, bias


def head_source_terms(
    pattern_row: Float[Tensor, "batch head_index key_pos"],
    v: Float[Tensor, "batch key_pos head_index d_head"],
    W_O: Float[Tensor, "head_index d_head d_model"],
    rho: Float[Tensor, "batch d_model"],
) -> Float[Tensor, "batch head_index key_pos"]:
    """``α^h_pj (v^h_j W_O^h) · ρ``: each edge's write to the receiver ``p`` read by ``ρ``
    (methods.md#signed-attribution-to-a-target), with ``W_O^h ρ`` formed once per head."""
    read = torch.einsum("hem,bm->bhe", W_O, rho)  # [batch, head, d_head]
    return pattern_row * torch.einsum("bjhe,bhe->bhj", v, read)
