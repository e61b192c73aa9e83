"""Per-receiver statistics of a layer map, for inputs too long to keep ``N×N`` maps
(methods.md#long-inputs).

Each row ``i`` of a map is read as shares ``p_ij = m_ij / Σ_j m_ij`` over the real keys:

* ``sink_share``: the share of the first ``sink_tokens`` real tokens (attention sinks);
* ``self_share``: ``p_ii``; ``window_share``: the share of the previous ``window`` tokens
  (``1 ≤ i − j ≤ window``) — with the sink share, how far a token reads;
* ``entropy``: ``−Σ_j p_ij log p_ij`` (nats);
* ``top_values`` / ``top_indices``: the ``top_k`` largest raw cells of the row and their keys
  (sparse: "where does token i read from"); ``row_sum``: ``Σ_j m_ij``, to turn values into shares.

Everything is ``O(N·k)`` per layer; padded receivers are NaN (indices −1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["RowStatistics", "row_statistics", "stack_statistics"]


@dataclass(frozen=True)
class RowStatistics:
    """Row statistics of one scope; tensors ``[layer, batch, query(, k)]`` (one layer: no
    leading axis before ``stack_statistics``)."""

    sink_share: Float[Tensor, "*layer batch query_pos"]
    self_share: Float[Tensor, "*layer batch query_pos"]
    window_share: Float[Tensor, "*layer batch query_pos"]
    entropy: Float[Tensor, "*layer batch query_pos"]
    row_sum: Float[Tensor, "*layer batch query_pos"]
    top_values: Float[Tensor, "*layer batch query_pos k"]
    top_indices: Int[Tensor, "*layer batch query_pos k"]
    window: int
    sink_tokens: int


def row_statistics(
    layer_map: Float[Tensor, "batch query_pos key_pos"],
    mask: Bool[Tensor, "batch pos"],
    *,
    top_k: int = 16,
    window: int = 128,
    sink_tokens: int = 1,
) -> RowStatistics:
    """The statistics of one layer map (padded cells already zero)."""
    batch, n, _ = layer_map.shape
    m = layer_map.float()
    row_sum = m.sum(-1)
    p = m / row_sum[..., None].clamp_min(torch.finfo(m.dtype).tiny)
    first = mask.int().argmax(dim=-1)  # first real position (left padding)
    keys = torch.arange(n, device=m.device)
    sink = (keys[None, :] >= first[:, None]) & (keys[None, :] < first[:, None] + sink_tokens)
    sink_share = (p * sink[:, None, :]).sum(-1)
    self_share = p.diagonal(dim1=-2, dim2=-1)
    # Σ_{i−window ≤ j ≤ i−1} p_ij from a running sum over the keys
    running = torch.nn.functional.pad(p.cumsum(-1), (1, 0))  # running[..., j] = Σ_{k<j} p
    rows = keys[None, :, None].expand(batch, n, 1)
    upper = running.gather(-1, rows).squeeze(-1)  # Σ_{k<i}
    lower = running.gather(-1, (rows - window).clamp_min(0)).squeeze(-1)  # Σ_{k<i−window}
    window_share = upper - lower
    entropy = -torch.special.xlogy(p, p).sum(-1)
    k = min(top_k, n)
    top_values, top_indices = m.topk(k, dim=-1)
    real = mask[:, :, None].expand(batch, n, k)
    top_indices = top_indices.masked_fill(top_values == 0, -1)  # no source: padding, the future
    nan = float("nan")
    return RowStatistics(
        sink_share=sink_share.masked_fill(~mask, nan),
        self_share=self_share.masked_fill(~mask, nan),
        window_share=window_share.masked_fill(~mask, nan),
        entropy=entropy.masked_fill(~mask, nan),
        row_sum=row_sum.masked_fill(~mask, nan),
        top_values=top_values.masked_fill(~real, nan),
        top_indices=top_indices.masked_fill(~real, -1).int(),
        window=window,
        sink_tokens=sink_tokens,
    )


def stack_statistics(per_layer: list[RowStatistics]) -> RowStatistics:
    """One ``RowStatistics`` with a leading layer axis."""
    first = per_layer[0]
    fields = ("sink_share", "self_share", "window_share", "entropy", "row_sum")
    stacked = {f: torch.stack([getattr(s, f) for s in per_layer]) for f in fields}
    return RowStatistics(
        **stacked,
        top_values=torch.stack([s.top_values for s in per_layer]),
        top_indices=torch.stack([s.top_indices for s in per_layer]),
        window=first.window,
        sink_tokens=first.sink_tokens,
    )
