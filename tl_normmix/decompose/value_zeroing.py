"""Value zeroing (Mohebbi et al. 2023; methods.md#the-peers-methods) of one layer: pure tensor
math, exact and without a forward per source.

For layer ``l`` and source ``j``, zeroing ``v^h_j`` (``b_V`` included) in every head removes exactly
column ``j`` of the attention parts: the attention output at receiver ``i`` becomes
``A_i − Σ_h α^h_ij f^h(x_j)`` (under grouped-query attention the key-value head is zeroed, so every
query head reading it loses the term — the same sum over query heads). Nothing before the
attention changes, so instead of a forward per (layer, source) only the block's tail runs
(``block_tail``: norms with recomputed scales, the feed-forward block), for a chunk of sources at
once, and only on the receivers that attend to them (``i ≥ j`` in causal models); the removal
reaches the feed-forward block's first matmul as an affine form (``PairForm``), so that matmul
costs ``N²·H·d_ff`` instead of ``N²·d·d_ff``. The score ``s_ij = 1 − cos(ŷ_i^{(j)}, y_i)``
compares with the clean block output; rows are divided by their sum, the diagonal included.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_normmix.decompose import attention
from tl_normmix.decompose.block_tail import RemovalTail, block_output, parallel_branch
from tl_normmix.decompose.blocks import LayerTensors, NormSpec
from tl_normmix.decompose.whole_layer import hidden_width

__all__ = ["source_bytes", "zeroing_scores"]


def zeroing_scores(
    t: LayerTensors,
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    mask: Bool[Tensor, "batch pos"],
    final: NormSpec | None = None,
    *,
    chunk: int | None = None,
    fold: bool = True,
) -> Float[Tensor, "batch query_pos key_pos"]:
    """Row-normalised ``1 − cos(ŷ_i^{(j)}, y_i)`` for one layer (``pattern`` masked): the block's
    tail re-run on the attention output without column ``j``, ``chunk`` sources at a time (each
    holds ``source_bytes`` of working memory; None: all at once). ``final``: compare after this
    norm (the model's final norm, at its last layer). ``fold=False``: each edited attention
    output written out and run through the tail (the reference for ``block_tail.RemovalTail``'s
    folded pre-activations)."""
    resid, attn = t["resid_pre"], t["attn_out"]
    branch = parallel_branch(t, resid)
    clean = _output(t, resid, attn, branch, final)
    f = attention.source_vectors(t.v, t.W_O)  # [batch, key, head, d]
    reaches = f.ne(0).any(dim=-1)  # [batch, key, head]: a nonzero value vector
    tail = RemovalTail(t, resid, attn, f, branch, fold=fold)
    batch, n, _ = resid.shape
    chunk = chunk or n
    out = resid.new_zeros(batch, n, n)
    reached = (pattern != 0).any(dim=1).any(dim=0)  # [query, key]: any head, any batch row
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = reached[:, start:stop].any(dim=1).nonzero()
        if rows.numel() == 0:
            continue
        low = int(rows[0])  # receivers before it are untouched (causal models: low = start)
        # α^h_ij of the chunk's sources j as [batch, source, query, head]
        weights = pattern[:, :, low:, start:stop].permute(0, 3, 2, 1).contiguous()
        edited = tail.outputs(weights, slice(low, None), slice(start, stop))
        if final is not None:
            edited = final.apply(edited, final.scale_of(edited))
        # float64 for 1 − cos of nearly parallel vectors; an untouched receiver (Δ_ij = 0: a
        # future key, a zero weight or value) keeps its clean output, so its score is exactly 0
        cos = torch.nn.functional.cosine_similarity(
            edited.double(), clean[:, None, low:].double(), dim=-1
        )
        untouched = ~((weights != 0) & reaches[:, start:stop, None, :]).any(dim=-1)
        score = (1.0 - cos).masked_fill(untouched, 0.0)
        out[:, low:, start:stop] = score.transpose(1, 2).to(out.dtype)
    out.masked_fill_(~(mask[:, :, None] & mask[:, None, :]), 0.0)
    return out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)


def source_bytes(t: LayerTensors) -> int:
    """Working memory of one source in ``zeroing_scores``: its edited block tails, float32."""
    batch, n, d = t["resid_pre"].shape
    return 4 * batch * n * (d * 4 + hidden_width(t.mlp))


def _output(
    t: LayerTensors, resid: Tensor, attn: Tensor, branch: Tensor | None, final: NormSpec | None
) -> Tensor:
    y = block_output(t, resid, attn, branch)
    return y if final is None else final.apply(y, final.scale_of(y))
