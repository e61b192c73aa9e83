"""``mixing_maps`` and ``hook_filter`` end to end on every tiny model of the installed TL.

Invariants checked: the ``attn_w`` layer map is the head mean of the cached pattern; value norms
equal ‖v^h_j W_O^h‖ built directly; a batch equals its rows computed one by one; a padded row
equals the same sequence unpadded; half-precision caches give float32 maps close to float32 runs;
a filtered cache is smaller and gives the same maps.
"""

from __future__ import annotations

import pytest
import torch
from helpers.checks import assert_rel_close
from helpers.tiny_models import (
    TL_MAJOR,
    Case,
    build,
    convention_of,
    drops_causal_mask,
    run_with_cache,
    runs,
    tokens,
)

import tl_normmix as nm


def _maps(model, toks, mask=None, **kwargs):
    scopes = kwargs.pop("scopes", ("attn_w",))
    names = nm.hook_filter(model, scopes, value_norms=True)
    _, cache = run_with_cache(model, toks, mask, names_filter=names)
    return nm.mixing_maps(
        model, cache, scopes, attention_mask=mask, tokens=toks, value_norms=True, **kwargs
    )


def test_attn_w_is_head_mean_of_cached_pattern(model):
    toks = tokens()
    _, cache = run_with_cache(model, toks)
    maps = nm.mixing_maps(model, cache, "attn_w")
    n_layers = model.cfg.n_layers
    assert maps["attn_w"].shape == (n_layers, 2, 7, 7)
    assert maps.heads["attn_w"].shape == (n_layers, 2, model.cfg.n_heads, 7, 7)
    assert maps["attn_w"].dtype == torch.float32
    for layer in range(n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].float()
        assert_rel_close(maps["attn_w"][layer], pattern.mean(1), what=f"layer {layer}")
        assert torch.equal(maps.heads["attn_w"][layer], pattern)
    # Rows are never renormalised: they sum to 1 except with attention sinks (GPT-OSS: < 1).
    rows = maps["attn_w"].sum(-1)
    cached = torch.stack(
        [
            cache[f"blocks.{layer}.attn.hook_pattern"].float().sum(-1).mean(1)
            for layer in range(n_layers)
        ]
    )
    assert torch.allclose(rows, cached, atol=1e-5)
    assert (rows <= 1 + 1e-5).all()


def test_value_norms_equal_direct_norms(model):
    toks = tokens()
    maps = _maps(model, toks)
    _, cache = run_with_cache(model, toks)
    for layer in range(model.cfg.n_layers):
        v = cache[f"blocks.{layer}.attn.hook_v"].float()
        if v.shape[1] != toks.shape[1]:  # the MLA bridge's hook_v is [batch, head, pos, d_head]
            v = v.transpose(1, 2)
        v = v.repeat_interleave(model.cfg.n_heads // v.shape[2], dim=2)
        W_O = model.blocks[layer].attn.W_O.float()
        direct = torch.einsum("bjhd,hdm->bjhm", v, W_O).norm(dim=-1).transpose(1, 2)
        assert_rel_close(maps.value_norms[layer], direct, what=f"value norms layer {layer}")


def test_batched_equals_per_example(model):
    toks = tokens(batch=3, pos=6, seed=3)
    batched = _maps(model, toks)
    for b in range(3):
        single = _maps(model, toks[b : b + 1])
        assert_rel_close(batched["attn_w"][:, b], single["attn_w"][:, 0], rtol=1e-4)
        assert_rel_close(batched.value_norms[:, b], single.value_norms[:, 0], rtol=1e-4)


def test_padded_equals_unpadded(model):
    long, short = tokens(1, 7, seed=1), tokens(1, 4, seed=2)
    padded = torch.cat([long, torch.cat([short, torch.full((1, 3), 3)], 1)])  # right padding
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    if drops_causal_mask(model):  # TransformerLens 4.3 + OpenAI-GPT: refused, not wrong
        with pytest.raises(nm.VerificationError, match="future positions"):
            _maps(model, padded, mask)
        return
    maps = _maps(model, padded, mask)
    alone = _maps(model, short)
    assert_rel_close(maps["attn_w"][:, 1, :4, :4], alone["attn_w"][:, 0], rtol=1e-4)
    assert_rel_close(maps.value_norms[:, 1, :, :4], alone.value_norms[:, 0], rtol=1e-4)
    assert (maps["attn_w"][:, 1, 4:, :] == 0).all() and (maps["attn_w"][:, 1, :, 4:] == 0).all()
    assert (maps.value_norms[:, 1, :, 4:] == 0).all()
    ratio = maps.mixing_ratio("attn_w")
    assert ratio[:, 1, 4:].isnan().all() and not ratio[:, 1, :4].isnan().any()
    assert torch.allclose(maps.mask, mask.bool())


def test_layers_subset(model):
    full = _maps(model, tokens())
    last = _maps(model, tokens(), layers=[-1])
    assert last.layers == (model.cfg.n_layers - 1,)
    assert torch.equal(last["attn_w"][0], full["attn_w"][-1])
    names = nm.hook_filter(model, "attn_w").hook_names
    assert names == {f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)}


def test_hook_filter_keeps_only_needed_hooks(model):
    toks = tokens()
    _, full = run_with_cache(model, toks)
    _, small = run_with_cache(model, toks, names_filter=nm.hook_filter(model, "attn_w"))
    assert set(small.keys()) < set(full.keys())
    size = sum(t.numel() for t in small.values())
    assert size * 5 < sum(t.numel() for t in full.values())
    assert torch.equal(
        nm.mixing_maps(model, small)["attn_w"], nm.mixing_maps(model, full)["attn_w"]
    )


def test_result_records_convention(case, model):
    maps = _maps(model, tokens())
    assert maps.convention == convention_of(case)
    assert maps.layers == tuple(range(model.cfg.n_layers))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cache_computes_in_float32(case, hf_root, dtype):
    toks = tokens()
    model = build(case, hf_root, dtype=dtype)
    if not runs(model):  # OLMo's LayerNorm fails in bfloat16 inside TransformerLens
        with pytest.raises(nm.UnsupportedModelError, match="TransformerLens cannot run"):
            nm.adapt(model)
        return
    reference = _maps(build(case, hf_root), toks)
    half = _maps(model, toks)
    assert half["attn_w"].dtype == torch.float32 and half.value_norms.dtype == torch.float32
    # Layer 0 only: deeper layers of a half-precision model compute different inputs (a router
    # may even pick other experts); exactness on the half-precision run itself is tested in
    # decompose/test_residual.py.
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    assert (half["attn_w"][0] - reference["attn_w"][0]).abs().max() < tol
    norms, ref_norms = half.value_norms[0], reference.value_norms[0]
    assert (norms - ref_norms).abs().max() / ref_norms.max() < tol


# -- bad input ----------------------------------------------------------------------------------
def test_missing_hook_names_it_and_shows_the_fix(model):
    _, cache = run_with_cache(model, tokens(), names_filter=lambda name: name.endswith("hook_v"))
    with pytest.raises(nm.MissingHookError) as err:
        nm.mixing_maps(model, cache, "attn_w")
    message = str(err.value)
    assert "blocks.0.attn.hook_pattern" in message
    assert "names_filter=nm.hook_filter(model, ('attn_w',))" in message
    assert err.value.missing == ("blocks.0.attn.hook_pattern",)


def test_cache_from_a_different_model_is_refused(hf_root):
    other = build(Case("gpt2_wide", "raw"), hf_root)  # 6 heads, d_model 48, 3 layers
    _, cache = run_with_cache(other, tokens())
    with pytest.raises(ValueError, match="different model"):
        nm.mixing_maps(build(Case("gpt2", "raw"), hf_root), cache, "attn_w", value_norms=True)


def test_unknown_scope_lists_valid_ones(model):
    with pytest.raises(ValueError, match="valid scopes: attn_w"):
        nm.hook_filter(model, ("attn_w", "attention"))


def test_layers_out_of_range(model):
    _, cache = run_with_cache(model, tokens())
    with pytest.raises(IndexError, match=r"layers 0\.\.1"):
        nm.mixing_maps(model, cache, layers=[2])


def test_mask_of_wrong_shape(model):
    _, cache = run_with_cache(model, tokens())
    with pytest.raises(ValueError, match="attention_mask has shape"):
        nm.mixing_maps(model, cache, attention_mask=torch.ones(2, 5))


MOE_FAMILIES = ["mixtral", "qwen2_moe", "gpt_oss"] if TL_MAJOR >= 4 else ["moe"]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_maps_keep_no_autograd_graph(family, hf_root):
    """A model's feed-forward module (mixture of experts, run through its own forward) leaves no
    graph on the maps: they are read, not differentiated."""
    model = build(Case(family, "raw"), hf_root)
    toks = tokens(2, 6)
    _, cache = run_with_cache(model, toks, None, names_filter=nm.hook_filter(model, "layer_n"))
    maps = nm.mixing_maps(model, cache, ("attn_n", "layer_n"))
    assert not any(m.requires_grad for m in maps.maps.values())
    assert not any(r.requires_grad for r in maps.ratios.values())
