"""Summary tables agree with the maps they summarise (padding excluded)."""

from __future__ import annotations

import torch
from helpers.tiny_models import drops_causal_mask, run_with_cache, tokens

import tl_normmix as nm
from tl_normmix.analysis.summary import format_table, layer_summary, mixing_ratio_stats, sink_share


def _padded_maps(model):
    toks = tokens(2, 6, seed=7)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    if drops_causal_mask(model):  # TransformerLens 4.3 + OpenAI-GPT: no masked runs
        mask = torch.ones_like(mask)
        _, cache = run_with_cache(model, toks)
    else:
        _, cache = run_with_cache(model, toks, mask)
    return nm.mixing_maps(
        model, cache, ("attn_w", "attn_n"), attention_mask=mask, tokens=toks, value_norms=True
    )


def test_mixing_ratio_stats_over_real_tokens(model):
    maps = _padded_maps(model)
    stats = mixing_ratio_stats(maps, "attn_n")
    real = maps.mixing_ratio("attn_n")[:, maps.mask]  # [layer, real tokens]
    assert torch.allclose(stats[:, 0], real.mean(-1))
    assert torch.equal(stats[:, 1], real.amax(-1)) and torch.equal(stats[:, 2], real.amin(-1))


def test_sink_share_by_weight_is_mean_received_weight(model):
    maps = _padded_maps(model)
    rows = maps["attn_w"][:, maps.mask]  # [layer, real queries, key]
    weights = rows[..., 0] / rows.sum(-1)  # share of token 0 (rows sum to < 1 with sinks)
    assert torch.allclose(sink_share(maps, "attn_w"), weights.mean(-1), atol=1e-6)
    assert ((sink_share(maps, "attn_n") >= 0) & (sink_share(maps, "attn_n") <= 1)).all()


def test_layer_summary_table(model):
    maps = _padded_maps(model)
    rows = layer_summary(maps)
    assert [r.layer for r in rows] == list(maps.layers)
    for row, stats in zip(rows, mixing_ratio_stats(maps, "attn_w"), strict=True):
        assert abs(row.mixing_ratio_attn_w - float(stats[0])) < 1e-6
    assert format_table(rows).splitlines()[0].split()[0] == "layer"
