"""A small hand-built ``MixingMaps`` with fixed numbers (views, plots and page snapshots)."""

from __future__ import annotations

import torch

from tl_normmix.maps import MixingMaps


def handmade(causal: bool = True) -> MixingMaps:
    """Two layers, two batch rows (row 1 has one padded token at the end), three heads."""
    gen = torch.Generator().manual_seed(0)
    layers, batch, heads, pos = 2, 2, 3, 4
    mask = torch.ones(batch, pos, dtype=torch.bool)
    mask[1, -1] = False
    pattern = torch.rand(layers, batch, heads, pos, pos, generator=gen)
    if causal:
        pattern = pattern.tril()
    pattern = pattern * mask[None, :, None, None, :] * mask[None, :, None, :, None]
    pattern = pattern / pattern.sum(-1, keepdim=True).clamp_min(1e-9)
    value_norms = 1 + 3 * torch.rand(layers, batch, heads, pos, generator=gen)
    per_head_norms = pattern * value_norms[..., None, :]
    norm_map = per_head_norms.sum(2) * 0.9
    res_map = norm_map + 2.5 * torch.eye(pos) * mask[None, :, :, None]
    ratios = {
        s: torch.rand(layers, batch, pos, generator=gen).masked_fill(~mask, float("nan"))
        for s in ("attn_w", "attn_n", "attnres_n")
    }
    return MixingMaps(
        layers=(0, 1),
        maps={"attn_w": pattern.mean(2), "attn_n": norm_map, "attnres_n": res_map},
        heads={"attn_w": pattern, "attn_n": per_head_norms},
        ratios=ratios,
        mask=mask,
        convention="raw",
        model_name="handmade",
        value_norms=value_norms,
        tokens=torch.arange(batch * pos).view(batch, pos),
        str_tokens=[["<s>", " The", " cat", "</script>"], ["<s>", " A", " dog", "<pad>"]],
        causal=causal,
    )
