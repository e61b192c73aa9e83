"""Per-source vectors carried through a block: the exact whole-model decomposition
(methods.md#the-peers-methods).

The stream entering a block is decomposed over the *input tokens* ``j``: ``x_i = Σ_j D_ij + c_i``
(``c`` collects the bias terms). One block maps it to the same form at its output:

* the attention input norm (pre-LN: LN1) is linear per token with its frozen scale:
  ``x̂_k = Σ_j g_k(D_kj) + (g_k(c_k) + β)``; the values are linear in it,
  ``v^h_k = Σ_j g_k(D_kj) W_V^h + (… + b_V^h)``, so the attention output is
  ``A_i = Σ_j Σ_h Σ_k α^h_ik g_k(D_kj) W_V^h W_O^h + bias``: the weights ``α`` are the real ones;
* every later norm is its frozen linear map at the receiver (methods.md#notation), residuals add
``D``;
* the feed-forward block splits its input's parts by integrated gradients along the straight path
  from the bias point — the closed forms of methods.md#the-feed-forward-block (quadrature for gated
  blocks, forward-mode quadrature of the module for mixtures of experts) with the decomposed input
  as the path.

Completeness holds at every block: ``Σ_j D_ij + c_i`` equals the block output the model computed.
Cost per block ``O(N²·d² + N³·d + N²·d·d_ff)``; memory: the parts ``D`` (``N²·d``, updated in
place, a chunk of receivers at a time), the value parts (``N²·H_kv·d_h``) and one chunk's work.
A part whose source no path reaches (``j > i`` in causal models) is exactly zero and is never
computed: causal models do about half the work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_normmix.decompose import attention, feedforward, generic_ff
from tl_normmix.decompose.attention_block import norm_chain
from tl_normmix.decompose.blocks import FFModule, LayerTensors, MLPSpec
from tl_normmix.decompose.residual import NormChain, through_bias
from tl_normmix.decompose.whole_layer import points_for

__all__ = ["Carried", "carry_block", "initial", "value_parts"]


@dataclass
class Carried:
    """The stream as parts over input tokens: ``parts[b, i, j]`` is ``D_ij``, ``bias[b, i]``
    is ``c_i``; ``reach[i]``: one past the last source whose part at receiver ``i`` can be
    non-zero (``i + 1`` in causal models: the later parts are exactly zero and are skipped)."""

    parts: Float[Tensor, "batch pos source d_model"]
    bias: Float[Tensor, "batch pos d_model"]
    reach: list[int]

    def total(self) -> Float[Tensor, "batch pos d_model"]:
        return self.parts.sum(2) + self.bias


def initial(resid: Float[Tensor, "batch pos d_model"]) -> Carried:
    """The embeddings: each token is its own source, ``D_ij = δ_ij x_i`` (positions included)."""
    batch, n, d = resid.shape
    parts = resid.new_zeros(batch, n, n, d)
    parts.diagonal(dim1=1, dim2=2).copy_(resid.transpose(1, 2))
    return Carried(parts, resid.new_zeros(batch, n, d), list(range(1, n + 1)))


def _reach_after(
    reach: list[int], pattern: Float[Tensor, "batch head_index query_pos key_pos"]
) -> list[int]:
    """A block's ``reach``: receiver ``i`` keeps its own sources and gains those of every key it
    attends to (norms and the feed-forward block act per receiver and keep zero parts zero)."""
    before = torch.tensor(reach, device=pattern.device)
    attended = (pattern != 0).any(dim=1).any(dim=0)  # [query, key]
    gained = torch.where(attended, before[None, :], 0).amax(dim=-1)
    return torch.maximum(before, gained).tolist()


def value_parts(
    t: LayerTensors,
    carried: Carried,
    W_V: Float[Tensor, "kv_head d_model d_head"],
    b_V: Float[Tensor, "kv_head d_head"],
    chunk: int,
) -> tuple[
    Float[Tensor, "batch kv_head pos source_x_d_head"], Float[Tensor, "batch pos kv_head d_head"]
]:
    """``(g_k(D_kj) W_V^h, (g_k(c_k) + β) W_V^h + b_V^h)``: the values of every token ``k`` split
    over the sources, ``attn_in`` (LN1 of pre-LN blocks) frozen at ``k``. The parts are laid out
    ``[batch, kv_head, k, (source, d_head)]``, ready for the mixing matmul."""
    chain = norm_chain(t, t.layout.attn_in)
    batch, n = carried.parts.shape[:2]
    heads, _, d_head = W_V.shape
    out = carried.parts.new_zeros(batch, heads, n, n * d_head)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        hi = max(carried.reach[start:stop])  # later sources: zero parts, zero values
        normed = _rows(chain, start, stop)(carried.parts[:, start:stop, :hi])  # [b, k, j, d]
        values = torch.einsum("bkjd,hde->bhkje", normed, W_V)
        out[:, :, start:stop, : hi * d_head] = values.reshape(
            batch, heads, stop - start, hi * d_head
        )
    normed_bias = through_bias(chain, carried.bias)
    bias = torch.einsum("bkd,hde->bkhe", normed_bias, W_V) + b_V
    return out, bias


def carry_block(
    t: LayerTensors,
    carried: Carried,
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    values: Float[Tensor, "batch kv_head pos source_x_d_head"],
    value_bias: Float[Tensor, "batch pos kv_head d_head"],
    mask: Bool[Tensor, "batch pos"],
    quadrature_points: int | None,
    chunk: int,
) -> Carried:
    """The block output as parts over the sources, written into ``carried.parts`` (receivers a
    chunk at a time: a receiver's new parts need only its own old ones and the value parts).
    ``pattern`` has padding masked; padded receivers end as zero rows."""
    layout = t.layout
    batch, n, _, d = carried.parts.shape
    heads, kv = pattern.shape[1], values.shape[1]
    group, d_head = heads // kv, t.W_O.shape[1]
    W_O = t.W_O.reshape(heads * d_head, d)  # rows (kv, group, d_head): query head h = kv·G + c
    # attention bias: Σ_h Σ_k α^h_ik (value bias)_k W_O^h + b_O, for every receiver at once
    grouped = pattern.view(batch, kv, group, n, n)
    mixed_bias = torch.einsum("bgcik,bkgd->bigcd", grouped, value_bias)
    attn_bias = mixed_bias.reshape(batch, n, heads * d_head) @ W_O + t.b_O
    pre, mid = norm_chain(t, layout.attn_out), norm_chain(t, layout.mid)
    ff_in, ff_out, post = (
        norm_chain(t, layout.mlp_in),
        norm_chain(t, layout.mlp_out),
        norm_chain(t, layout.post),
    )
    new_bias = carried.bias.new_empty(batch, n, d)
    mlp = t.mlp if layout.has_mlp else None
    points = points_for(t, mlp, quadrature_points) if mlp is not None else None
    reach = _reach_after(carried.reach, pattern)
    ends = attention.attended_ends(pattern)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = slice(start, stop)
        # sources from `hi` on have zero parts at these receivers, keys from `keys` on zero weight
        hi, keys = max(reach[rows]), max(stop, *ends[rows])
        old, old_bias = carried.parts[:, rows, :hi], carried.bias[:, rows]
        size = stop - start
        alpha = grouped[:, :, :, rows, :keys].reshape(batch, kv, group * size, keys)
        # [b, kv, (group, chunk), (source, d_head)]
        mixed = torch.matmul(alpha, values[:, :, :keys, : hi * d_head])
        mixed = mixed.view(batch, kv, group, size, hi, d_head).permute(0, 3, 4, 1, 2, 5)
        attn = mixed.reshape(batch, size, hi, heads * d_head) @ W_O  # [b, chunk, source, d]
        del mixed
        written = _rows(pre, start, stop)(attn)
        written_bias = through_bias(_rows(pre, start, stop), attn_bias[:, rows])
        if layout.parallel:
            stream, stream_bias = old + written, old_bias + written_bias
            branch_in, branch_bias = old, old_bias
        else:
            chain = _rows(mid, start, stop)
            stream = chain(old + written)
            stream_bias = through_bias(chain, old_bias + written_bias)
            branch_in, branch_bias = stream, stream_bias
        del written
        if mlp is not None:
            chain = _rows(ff_in, start, stop)
            u, u_bias = chain(branch_in), through_bias(chain, branch_bias)
            ig = _integrated_gradients(mlp, u, u_bias, points)
            del u
            out_chain = _rows(ff_out, start, stop)
            stream = stream + out_chain(ig)
            stream_bias = stream_bias + through_bias(out_chain, mlp.forward(u_bias))
            del ig
        chain = _rows(post, start, stop)
        carried.parts[:, rows, :hi] = chain(stream)
        new_bias[:, rows] = through_bias(chain, stream_bias)
    padded = ~mask
    if bool(padded.any()):
        carried.parts[padded] = 0.0
        new_bias[padded] = 0.0
    carried.bias = new_bias
    carried.reach = reach
    return carried


def _integrated_gradients(
    mlp: MLPSpec | FFModule,
    u: Float[Tensor, "batch chunk source d_model"],
    u_bias: Float[Tensor, "batch chunk d_model"],
    points: int | None,
) -> Float[Tensor, "batch chunk source d_model"]:
    """``IG_ij`` of the feed-forward block for the parts ``u_ij``
    (methods.md#the-feed-forward-block)."""
    total = u.sum(2)
    if isinstance(mlp, FFModule):
        assert points is not None
        ig = generic_ff.integrated_gradients(mlp, u.transpose(1, 2), total, u_bias, points)
        return ig.transpose(1, 2)
    k = feedforward.ig_coefficients(mlp, total, u_bias, quadrature_points=points)
    k = feedforward.IGCoefficients(
        k_in=k.k_in[:, :, None], k_gate=k.k_gate[:, :, None] if k.k_gate is not None else None
    )
    gate = u @ mlp.W_gate if mlp.W_gate is not None else None
    hidden = feedforward.ig_hidden(u @ mlp.W_in, gate, k, inplace=True)
    return hidden @ mlp.W_out


def _rows(chain: NormChain, start: int, stop: int) -> NormChain:
    """The chain with the scales of receivers ``start:stop`` only."""
    return NormChain([(norm, scale[:, start:stop]) for norm, scale in chain.norms])
