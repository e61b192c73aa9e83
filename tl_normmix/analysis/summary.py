"""Per-layer summary tables of a ``MixingMaps`` (a consumer: it never reads the cache).

For each layer: the ``attn_w`` mixing ratio (weight given to other tokens), the token that
receives most attention weight (the "sink"), its share of the weight, and its value norm
``‖f^h(x_j)‖`` relative to the other tokens' — the quantity that shows a heavily attended token
writing little (Kobayashi et al. 2020).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from tl_normmix.maps import MixingMaps

__all__ = ["LayerSummary", "format_table", "layer_summary", "mixing_ratio_stats", "sink_share"]


@dataclass(frozen=True)
class LayerSummary:
    layer: int
    mixing_ratio_attn_w: float  # mean over real tokens of Σ_{j≠i} ᾱ_ij
    sink_token: str  # the key with the largest mean received weight (batch row 0 label)
    sink_weight_share: float  # mean over real queries of ᾱ_{i,sink}
    sink_value_norm: float  # mean over heads of ‖f^h(x_sink)‖
    other_value_norm: float  # mean over heads and the other real tokens of ‖f^h(x_j)‖


def layer_summary(maps: MixingMaps) -> list[LayerSummary]:
    """One row per computed layer; statistics over real tokens of every batch row.

    The sink is chosen per batch row as the key with most mean received ``attn_w``; shares and
    norms are averaged over batch rows, the label is batch row 0's.
    """
    if maps.value_norms is None:
        raise ValueError(
            "layer_summary needs value norms: call mixing_maps(..., value_norms=True)."
        )
    weights = maps["attn_w"]  # [layer, batch, query, key]
    mask = maps.mask
    ratio = maps.mixing_ratio("attn_w")
    n_real = mask.sum(-1).clamp_min(1)  # [batch]
    received = (weights * mask[None, :, :, None]).sum(-2) / n_real[None, :, None]
    received = received.masked_fill(~mask[None], float("-inf"))
    sink = received.argmax(-1)  # [layer, batch]
    norms = maps.value_norms.mean(2)  # [layer, batch, key], mean over heads
    rows = []
    for index, layer in enumerate(maps.layers):
        share, sink_norm, other_norm = [], [], []
        for b in range(mask.shape[0]):
            j = int(sink[index, b])
            share.append(float(received[index, b, j]))
            sink_norm.append(float(norms[index, b, j]))
            others = mask[b].clone()
            others[j] = False
            other_norm.append(float(norms[index, b][others].mean()) if others.any() else 0.0)
        label = str(int(sink[index, 0]))
        if maps.str_tokens is not None:
            label = f"{maps.str_tokens[0][int(sink[index, 0])]!r}@{label}"
        rows.append(
            LayerSummary(
                layer=layer,
                mixing_ratio_attn_w=float(torch.nanmean(ratio[index])),
                sink_token=label,
                sink_weight_share=sum(share) / len(share),
                sink_value_norm=sum(sink_norm) / len(sink_norm),
                other_value_norm=sum(other_norm) / len(other_norm),
            )
        )
    return rows


def format_table(rows: list[LayerSummary]) -> str:
    """A plain-text table of ``layer_summary`` rows."""
    if not rows:
        return "(no layers)"
    columns = list(asdict(rows[0]))
    cells = [[_fmt(v) for v in asdict(r).values()] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def mixing_ratio_stats(maps: MixingMaps, scope: str) -> torch.Tensor:
    """``[layer, 3]``: mean, max and min of the mixing ratio over the real tokens of the batch."""
    ratio = maps.mixing_ratio(scope)  # NaN at padding
    real = ~ratio.isnan()
    flat = ratio.masked_fill(~real, 0.0).flatten(1)
    count = real.flatten(1).sum(-1).clamp_min(1)
    high = ratio.masked_fill(~real, float("-inf")).flatten(1).amax(-1)
    low = ratio.masked_fill(~real, float("inf")).flatten(1).amin(-1)
    return torch.stack([flat.sum(-1) / count, high, low], dim=-1)


def sink_share(maps: MixingMaps, scope: str, sink: int = 0) -> torch.Tensor:
    """``[layer]``: the share ``map[i, sink] / Σ_j map[i, j]`` received by token ``sink``, averaged
    over the real queries of every batch row (for ``attn_w`` this is the attention weight where
    rows sum to 1; with attention sinks (GPT-OSS) it is the share of the weight given to tokens)."""
    full = maps[scope]
    share = full[..., sink] / full.sum(-1).clamp_min(torch.finfo(full.dtype).tiny)
    real = maps.mask[None].expand_as(share)
    return (share * real).sum((1, 2)) / real.sum((1, 2))
