"""GlobEnc and ALTI (methods.md#the-peers-methods) against a direct reference that materialises
every pair vector.

On every family and mode: the resultant ``y_i`` that ALTI's parts rebuild is the model's own
(the stream after the attention branch, through the norms that read it); the fast ``alti`` map,
its per-head routes with the residual as one more part (with and without the floor of
llm-transparency-tool) and ``globenc_n`` equal the reference, with and without padding; GlobEnc
is refused with the reason on every layout that is not post-LN.
"""

from __future__ import annotations

import pytest
import torch
from helpers import reference
from helpers.checks import assert_rel_close, read_layers
from helpers.tiny_models import build, drops_causal_mask, run_with_cache, tokens

import tl_normmix as nm
from tl_normmix import memory


def _globenc(model) -> bool:
    layout = nm.adapt(model).layout
    return bool(layout.mid and layout.post and not layout.parallel)


def test_alti_resultant_is_the_models(model):
    """Σ_j T_i(x_j) + bias = the stream after the attention branch, through the norms that read
    it before any branch (post-LN: LN1's output) — rebuilt from the cached hooks."""
    toks = tokens()
    mask = torch.ones(toks.shape, dtype=torch.bool)
    _, layers = read_layers(model, toks)
    for t in layers:
        parts, bias = reference.alti_parts(t, mask)
        attn = t["attn_out"].double()
        for name in t.layout.attn_out:
            attn = reference._double(t.norms[name]).apply(attn, t.scale(name).double())
        y = t["resid_pre"].double() + attn
        for name in t.layout.mid:
            y = reference._double(t.norms[name]).apply(y, t.scale(name).double())
        assert_rel_close(parts.sum(2) + bias, y, what=f"layer {t.layer} resultant")


@pytest.mark.parametrize("blocks", ["cache-sized", "one pair"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_fast_equals_reference(model, padded, blocks, monkeypatch):
    if blocks == "one pair":  # every block of receivers × keys is one pair: the loops' edges
        monkeypatch.setattr(memory, "CACHE_BLOCK_BYTES", 4)  # one float
    toks = tokens(2, 7, seed=3)
    mask = (
        torch.tensor([[1] * 7, [1] * 4 + [0] * 3]) if padded else torch.ones(2, 7, dtype=torch.long)
    )
    scopes = ("alti", "globenc_n") if _globenc(model) else ("alti",)
    run_mask = mask if padded else None
    _, cache = run_with_cache(model, toks, run_mask, names_filter=nm.hook_filter(model, scopes))
    if padded and drops_causal_mask(model):
        return  # OpenAI-GPT under TL 4.3 with a mask: refused (test_residual)
    maps = nm.mixing_maps(model, cache, scopes, attention_mask=mask)
    real = mask.bool()
    pair = real[:, :, None] & real[:, None, :]
    _, layers = read_layers(model, toks, mask=run_mask)
    floored = nm.mixing_maps(
        model, cache, "alti", attention_mask=mask, options=nm.AltiOptions(floor=1e-5)
    )
    for index, t in enumerate(layers):
        expected = reference.alti(t, real)
        assert_rel_close(maps["alti"][index], expected, rtol=1e-4, what=f"alti {index}")
        assert torch.allclose(maps["alti"][index].sum(-1)[real], torch.ones(()), atol=1e-5)
        ratio = 1 - expected.diagonal(dim1=1, dim2=2)
        got_ratio = maps.mixing_ratio("alti")[index][real].double()
        assert torch.allclose(got_ratio, ratio[real], rtol=1e-4, atol=1e-5)  # 1 − share
        for result, floor in ((maps, 0.0), (floored, 1e-5)):
            heads, share = reference.alti_routes(t, real, floor)
            what = f"routes floor={floor} {index}"
            got = result.heads["alti"][index]
            assert_rel_close(
                got.masked_fill(~pair[:, None], 0),
                heads.masked_fill(~pair[:, None], 0),
                rtol=1e-4,
                what=what,
            )
            # shares of a row that sums to 1: float32 cancellation in ‖y‖₁ − ‖y − x‖₁ is ~1e-7
            got_share = result.residual_share["alti"][index][real].double()
            assert torch.allclose(got_share, share[real], rtol=1e-4, atol=1e-5), what
            assert result.residual_share["alti"][index][~real].isnan().all()
            total = got.sum(dim=(1, 3)) + result.residual_share["alti"][index]
            assert torch.allclose(total[real], torch.ones(()), atol=1e-5)
        if "globenc_n" in scopes:
            parts, _ = reference.globenc(t, real)
            expected = parts.norm(dim=-1).masked_fill(~pair, 0.0)
            assert_rel_close(maps["globenc_n"][index], expected, rtol=1e-4, what=f"globenc {index}")


def test_globenc_refused_outside_post_ln(model):
    if _globenc(model):
        nm.hook_filter(model, "globenc_n")  # accepted
        return
    with pytest.raises(nm.UnsupportedScopeError, match="GlobEnc is defined for post-LN"):
        nm.hook_filter(model, "globenc_n")


def test_future_tokens_get_the_floor_share(hf_root):
    """llm-transparency-tool's floor: exact zeros (future keys of a causal model) get the floor
    before normalisation, so their share is positive; without it they stay zero."""
    from helpers.tiny_models import Case

    model = build(Case("gpt2", "raw"), hf_root)
    toks = tokens(1, 6)
    _, cache = run_with_cache(model, toks, names_filter=nm.hook_filter(model, "alti"))
    plain = nm.mixing_maps(model, cache, "alti").heads["alti"]
    floored = nm.mixing_maps(model, cache, "alti", options=nm.AltiOptions(floor=1e-5)).heads["alti"]
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)
    assert (plain[..., future] == 0).all()
    assert (floored[..., future] > 0).all()


def test_pairwise_distance_eps_reproduces_the_reference_codes(hf_root):
    """``AltiOptions(eps=1e-6)``: ``‖T − y + eps‖₁`` as ``pairwise_distance`` computes it, for
    the map and the routes (with the tool's floor)."""
    from helpers.tiny_models import Case

    for family in ("gpt2", "bert"):
        model = build(Case(family, "raw"), hf_root)
        toks = tokens(1, 6)
        _, cache = run_with_cache(model, toks, names_filter=nm.hook_filter(model, "alti"))
        maps = nm.mixing_maps(model, cache, "alti", options=nm.AltiOptions(floor=1e-5, eps=1e-2))
        plain = nm.mixing_maps(model, cache, "alti")
        _, layers = read_layers(model, toks)
        real = torch.ones(toks.shape, dtype=torch.bool)
        for index, t in enumerate(layers):
            expected = reference.alti(t, real, eps=1e-2)
            assert_rel_close(maps["alti"][index], expected, rtol=1e-4, what=family)
            assert not torch.allclose(plain["alti"][index], maps["alti"][index], atol=1e-6)
            heads, share = reference.alti_routes(t, real, 1e-5, eps=1e-2)
            assert_rel_close(maps.heads["alti"][index], heads, rtol=1e-4, what=family)
            assert torch.allclose(maps.residual_share["alti"][index].double(), share, atol=1e-5)


def test_value_bias_to_no_part_as_llm_transparency_tool(hf_root):
    """``AltiOptions(value_bias="bias")``: the parts leave out ``b_V W_O`` (the tool folds value
    biases into ``b_O``); the resultant is unchanged, so the residual share moves; without value
    biases (Llama) nothing changes."""
    from helpers.tiny_models import TL_MAJOR, Case

    families = ("gpt2", "llama_bias", "llama") if TL_MAJOR >= 4 else ("gpt2", "llama")
    for family in families:
        model = build(Case(family, "raw"), hf_root)
        toks = tokens(1, 6)
        _, cache = run_with_cache(model, toks, names_filter=nm.hook_filter(model, "alti"))
        folded = nm.mixing_maps(
            model, cache, "alti", options=nm.AltiOptions(floor=1e-5, value_bias="bias")
        )
        plain = nm.mixing_maps(model, cache, "alti", options=nm.AltiOptions(floor=1e-5))
        _, layers = read_layers(model, toks)
        real = torch.ones(toks.shape, dtype=torch.bool)
        for index, t in enumerate(layers):
            heads, share = reference.alti_routes(t, real, 1e-5, fold=True)
            assert_rel_close(folded.heads["alti"][index], heads, rtol=1e-4, what=family)
            assert torch.allclose(folded.residual_share["alti"][index].double(), share, atol=1e-5)
        changed = not torch.allclose(folded.heads["alti"], plain.heads["alti"], atol=1e-6)
        has_value_bias = any(bool((t.b_V != 0).any()) for t in layers)  # not TL4's tiny llama
        assert changed == has_value_bias, family
    with pytest.raises(ValueError, match="value_bias"):
        nm.mixing_maps(model, cache, "alti", options=nm.AltiOptions(value_bias="nowhere"))
