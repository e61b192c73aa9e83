"""``run_mixing_maps`` (methods.md#long-inputs): maps computed during the forward pass.

* ``keep="maps"`` equals ``run_with_cache`` + ``mixing_maps`` on every family and mode (layer
  maps, ratios, completeness, per-head maps, value norms), padded batches included;
* ``keep="stats"`` equals the statistics of the cached maps (``row_statistics`` is tested against
  a direct loop in ``test_row_statistics.py``);
* the forward pass stops after the last requested layer; ``stop_at_layer``; ``dtype``;
* bad input: a text longer than the context, unknown options, memory that will not fit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import Case, build, drops_causal_mask, run_with_cache, tokens

import tl_normmix as nm
from tl_normmix import memory
from tl_normmix.maps import UnsupportedScopeError
from tl_normmix.maps import streaming as forward_maps
from tl_normmix.maps.statistics import row_statistics


def _scopes(model) -> list[str]:
    out = []
    for scope in ("attn_w", "attn_n", "attnres_n", "attnresln_n", "layer_n"):
        try:
            nm.hook_filter(model, scope)
        except UnsupportedScopeError:
            continue
        out.append(scope)
    return out


def _same(got, expected, what):
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, equal_nan=True, msg=what)


def test_keep_maps_equals_the_cached_route(case, model):
    """Unpadded on every family and mode; padded too on the raw models."""
    padding = [None]
    if case.mode == "raw" and not drops_causal_mask(model):  # OpenAI-GPT: see test_residual
        padding.append(torch.tensor([[1] * 7, [1] * 4 + [0] * 3]))
    scopes = _scopes(model)
    toks = tokens(2, 7, seed=8)
    for mask in padding:
        _, cache = run_with_cache(
            model, toks, mask, names_filter=nm.hook_filter(model, scopes, value_norms=True)
        )
        expected = nm.mixing_maps(model, cache, scopes, attention_mask=mask, value_norms=True)
        got = nm.run_mixing_maps(
            model, toks, scopes, attention_mask=mask, keep_heads=True, value_norms=True
        )
        assert got.layers == expected.layers and got.scopes == expected.scopes
        for scope in scopes:
            _same(got[scope], expected[scope], scope)
            _same(got.mixing_ratio(scope), expected.mixing_ratio(scope), f"{scope} ratio")
        for scope in expected.completeness:
            _same(got.completeness[scope], expected.completeness[scope], f"{scope} completeness")
        for scope in expected.heads:
            _same(got.heads[scope], expected.heads[scope], f"{scope} heads")
        _same(got.value_norms, expected.value_norms, "value norms")
        assert got.verification.keys() == expected.verification.keys()
        torch.testing.assert_close(got.mask, expected.mask)


def test_keep_stats_equals_statistics_of_the_cached_maps(hf_root):
    model = build(Case("llama", "raw"), hf_root)
    toks = tokens(2, 9, seed=1)
    mask = torch.tensor([[1] * 9, [0] * 3 + [1] * 6])  # left padding
    scopes = ["attn_n", "attnresln_n"]
    _, cache = run_with_cache(model, toks, mask, names_filter=nm.hook_filter(model, scopes))
    maps = nm.mixing_maps(model, cache, scopes, attention_mask=mask)
    got = nm.run_mixing_maps(
        model, toks, scopes, keep="stats", attention_mask=mask, top_k=3, window=2
    )
    assert got.maps == {} and not got.heads
    assert got.value_norms is not None and got.value_norms.shape[:2] == (2, 2)
    for scope in scopes:
        _same(got.mixing_ratio(scope), maps.mixing_ratio(scope), scope)
        for index in range(2):
            expected = row_statistics(maps[scope][index], maps.mask, top_k=3, window=2)
            stats = got.stats[scope]
            for field in ("sink_share", "self_share", "window_share", "entropy", "row_sum"):
                _same(getattr(stats, field)[index], getattr(expected, field), field)
            _same(stats.top_values[index], expected.top_values, "top values")
            assert torch.equal(stats.top_indices[index], expected.top_indices)
        with pytest.raises(KeyError, match="keep='stats'"):
            got[scope]


def test_the_forward_stops_after_the_last_layer(hf_root):
    model = build(Case("gpt2", "raw"), hf_root)
    fired = []
    last = nm.adapt(model).spec.n_layers - 1
    spy = [(f"blocks.{last}.hook_resid_pre", lambda t, hook: fired.append(1))]
    with model.hooks(fwd_hooks=spy):
        maps = nm.run_mixing_maps(model, tokens(1, 6), "attn_n", layers=[0])
    assert maps.layers == (0,) and fired == []
    with model.hooks(fwd_hooks=spy):
        nm.run_mixing_maps(model, tokens(1, 6), "attn_n")
    assert fired == [1]
    stopped = nm.run_mixing_maps(model, tokens(1, 6), "attn_n", stop_at_layer=1)
    assert stopped.layers == (0,)
    with pytest.raises(ValueError, match="at or after stop_at_layer"):
        nm.run_mixing_maps(model, tokens(1, 6), "attn_n", layers=[1], stop_at_layer=1)


def test_half_precision_keeps_half_the_bytes(hf_root):
    model = build(Case("gpt2", "raw"), hf_root)
    full = nm.run_mixing_maps(model, tokens(1, 6), "attn_n")
    half = nm.run_mixing_maps(model, tokens(1, 6), "attn_n", dtype=torch.float16)
    assert half["attn_n"].dtype == torch.float16
    torch.testing.assert_close(half["attn_n"].float(), full["attn_n"], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_lower_triangles_kept_during_the_run_give_the_dense_maps(dtype):
    """A causal model's maps are held as lower triangles until ``build``; a map with anything
    above its diagonal turns its scope dense (earlier layers unpacked), never a lost value."""
    from tl_normmix.maps.engine import LayerResult, MapsBuilder
    from tl_normmix.maps.heads import LayerFactors

    generator = torch.Generator().manual_seed(0)
    lower = [torch.rand(2, 5, 5, generator=generator).tril() for _ in range(3)]
    full = torch.rand(2, 5, 5, generator=generator)  # the second scope's layer 1: not triangular
    builder = MapsBuilder(None, 3, dtype=dtype, pack_lower=True)  # the plan is read by build only
    for index in range(3):
        maps = {"a": lower[index], "b": full if index == 1 else lower[index]}
        builder.add(index, LayerResult(maps, {}, {}, LayerFactors(None, None), None))
        assert ("a" in builder.packed) and ("b" in builder.packed) == (index == 0)
    for scope in list(builder.packed):
        builder._unpack(scope)
    expected_b = torch.stack([lower[0], full, lower[2]])
    for scope, expected in (("a", torch.stack(lower)), ("b", expected_b)):
        got = builder.outputs[scope]
        assert got.dtype == (dtype or torch.float32)
        torch.testing.assert_close(got, expected.to(got.dtype))
    assert not builder.packed


def test_bad_input_is_refused(hf_root, monkeypatch):
    model = build(Case("gpt2", "raw"), hf_root)
    n_ctx = model.cfg.n_ctx
    with pytest.raises(ValueError, match=f"reads at most {n_ctx}"):
        nm.run_mixing_maps(model, tokens(1, n_ctx + 1), "attn_n")
    with pytest.raises(TypeError, match="windwo"):
        nm.run_mixing_maps(model, tokens(1, 4), "attn_n", windwo=3)
    with pytest.raises(ValueError, match="keep must be"):
        nm.run_mixing_maps(model, tokens(1, 4), "attn_n", keep="everything")
    with pytest.raises(ValueError, match="keep_heads"):
        nm.run_mixing_maps(model, tokens(1, 4), "attn_n", keep="stats", keep_heads=True)
    need = forward_maps.estimate_bytes(1, 40, 4, 1, 2)
    monkeypatch.setattr(memory, "free_bytes", lambda device: need - 1)
    with pytest.raises(MemoryError, match="tokens would fit; keep='stats' needs"):
        nm.run_mixing_maps(model, tokens(1, 40), "attn_n")
    nm.run_mixing_maps(model, tokens(1, 40), "attn_n", check_memory=False)  # the user's call


@pytest.mark.parametrize(
    ("family", "scopes"),
    [
        ("gpt2", ["attn_n"]),
        ("gpt2", ["attn_n", "alti"]),
        ("gpt2", ["attn_n", "layer_n"]),
        ("llama", ["attn_n", "layer_n"]),
    ],
)
def test_estimate_bytes_follows_the_measured_peak(family, scopes, hf_root):
    """``estimate_bytes`` against the peak resident memory of a run (128 sequences, so the
    ``N²`` terms and the whole-layer chunk dominate), measured in a fresh process whose large
    allocations go straight to the system: within 0.8–1.6× of it."""
    script = Path(__file__).with_name("peak_memory.py")
    env = os.environ | {
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
        "MALLOC_ARENA_MAX": "1",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, str(script), str(hf_root), family, "128", *scopes],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = result["estimate"] / result["measured"]
    assert 0.8 <= ratio <= 1.6, result
