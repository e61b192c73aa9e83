"""Per-receiver statistics (methods.md#long-inputs) against a direct loop over rows, with
padding."""

from __future__ import annotations

import math

import torch

from tl_normmix.maps.statistics import row_statistics, stack_statistics


def test_statistics_equal_a_direct_loop():
    gen = torch.Generator().manual_seed(0)
    n = 9
    m = torch.rand(2, n, n, generator=gen).tril()  # causal rows
    mask = torch.tensor([[True] * n, [False] * 2 + [True] * (n - 2)])  # left padding
    pair = mask[:, :, None] & mask[:, None, :]
    m = m * pair
    m[0, 4, 1] = 0.0  # a zero cell
    stats = row_statistics(m, mask, top_k=3, window=2, sink_tokens=2)
    for b in range(2):
        first = int(mask[b].nonzero()[0])
        for i in range(n):
            if not mask[b, i]:
                assert math.isnan(float(stats.entropy[b, i]))
                assert (stats.top_indices[b, i] == -1).all()
                continue
            row = m[b, i]
            p = row / row.sum()
            assert math.isclose(float(stats.row_sum[b, i]), float(row.sum()), rel_tol=1e-6)
            sink = float(p[first : first + 2].sum())
            assert math.isclose(float(stats.sink_share[b, i]), sink, rel_tol=1e-5, abs_tol=1e-7)
            assert math.isclose(float(stats.self_share[b, i]), float(p[i]), rel_tol=1e-5)
            window = float(sum(p[j] for j in range(max(0, i - 2), i)))
            assert math.isclose(float(stats.window_share[b, i]), window, abs_tol=1e-6)
            entropy = -sum(float(x) * math.log(float(x)) for x in p if x > 0)
            assert math.isclose(float(stats.entropy[b, i]), entropy, rel_tol=1e-5, abs_tol=1e-6)
            values, order = row.sort(descending=True)
            for slot in range(3):
                if values[slot] > 0:
                    assert int(stats.top_indices[b, i, slot]) == int(order[slot])
                    assert float(stats.top_values[b, i, slot]) == float(values[slot])
                else:  # fewer sources than k: no index
                    assert int(stats.top_indices[b, i, slot]) == -1
    stacked = stack_statistics([stats, stats])
    assert stacked.entropy.shape == (2, 2, n) and stacked.top_indices.shape == (2, 2, n, 3)
