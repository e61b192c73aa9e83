"""Self-verification on every cache (``models.checks``): it passes on every honest cache, keeps its
residuals, and refuses a cache on which the maps would not add up.

Invariants: on every family × mode the identities of the requested scopes are checked and below
tolerance, and the residuals are in ``MixingMaps.verification``; a run with a hook that rewrites
the residual stream (``hook_resid_mid``) or the pure attention output, or a cache edited after the
run, raises ``VerificationError`` naming the model, the layer, the identity, the error and the
cause; ``verify=False`` returns the maps without checking.
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import TL_MAJOR, Case, build, run_with_cache, tokens

import tl_normmix as nm
from tl_normmix.maps import SCOPES, UnsupportedScopeError
from tl_normmix.models.checks import tolerance


def _all_scopes(model) -> list[str]:
    layout = nm.adapt(model).layout
    out = []
    for scope in SCOPES.values():
        try:
            scope.check_layout(layout)
        except UnsupportedScopeError:
            continue
        out.append(scope.name)
    return out


def test_every_identity_holds_and_is_kept(model):
    scopes = _all_scopes(model)
    toks = tokens(1, 5)
    _, cache = run_with_cache(model, toks, names_filter=nm.hook_filter(model, scopes))
    maps = nm.mixing_maps(model, cache, scopes)
    assert set(maps.verification) == set(maps.layers)
    for residuals in maps.verification.values():
        assert "attention output" in residuals and "block output" in residuals
        assert max(residuals.values()) <= tolerance(torch.float32)
        layout = nm.adapt(model).layout
        if layout.has_mlp:
            assert "feed-forward output" in residuals
        used = {*layout.attn_out, *layout.mid, *layout.mlp_in, *layout.mlp_out, *layout.post}
        for norm in used - {"residual_multiplier"}:  # attn_in is inside f^h(x_j): not used
            # an nn.Identity slot has no scale to check, only its input
            assert {f"{norm} scale", f"{norm} input"} & set(residuals), norm


def test_attention_scopes_check_what_they_use(model):
    _, cache = run_with_cache(model, tokens(), names_filter=nm.hook_filter(model, "attnres_n"))
    maps = nm.mixing_maps(model, cache, "attnres_n")
    checked = maps.verification[0]
    assert "attention output" in checked
    assert "feed-forward output" not in checked  # not what attnres_n rests on
    weights = nm.mixing_maps(model, cache, "attn_w")
    assert set(weights.verification[0]) <= {"causal mask"}


def _edit(model, hook: str, scale: float = 1.5):
    def rewrite(tensor, hook):
        return tensor * scale

    return model.hooks(fwd_hooks=[(hook, rewrite)])


EDITED = [("gpt2", "hook_resid_mid"), ("llama", "hook_resid_mid")]
if TL_MAJOR >= 4:
    EDITED += [("gemma2", "hook_resid_mid"), ("olmo2", "hook_resid_mid"), ("bert", "ln2.hook_in")]


@pytest.mark.parametrize(("family", "hook"), EDITED, ids=[f for f, _ in EDITED])
def test_a_hook_that_rewrites_the_residual_stream_is_caught(family, hook, hf_root):
    model = build(Case(family, "raw"), hf_root)
    scopes = ("attnres_n", "layer_n")
    names = nm.hook_filter(model, scopes)
    with _edit(model, f"blocks.0.{hook}"), torch.no_grad():
        _, cache = model.run_with_cache(tokens(), names_filter=names)
    with pytest.raises(nm.VerificationError) as err:
        nm.mixing_maps(model, cache, scopes)
    message = str(err.value)
    assert err.value.layer == 0 and err.value.error > tolerance(torch.float32)
    assert f"layer 0 ({nm.adapt(model).layout.name} block)" in message
    assert err.value.identity in message and "Likely cause" in message
    assert "a hook edited" in message and "verify=False" in message
    # verify=False computes them anyway (the user takes responsibility)
    maps = nm.mixing_maps(model, cache, scopes, verify=False)
    assert maps.verification == {} and maps["layer_n"].isfinite().all()


def test_a_cache_edited_after_the_run_is_caught(hf_root):
    model = build(Case("gpt2", "raw"), hf_root)
    names = nm.hook_filter(model, "attn_n")
    _, cache = run_with_cache(model, tokens(), names_filter=names)
    cache.cache_dict["blocks.1.attn.hook_v"] = cache["blocks.1.attn.hook_v"] * 2.0
    with pytest.raises(nm.VerificationError, match=r"layer 1 .*attention output"):
        nm.mixing_maps(model, cache, "attn_n")


def test_a_wrong_activation_is_caught(hf_root, monkeypatch):
    """Were the activation read wrongly (cfg.act_fn says relu on BLOOM), the check refuses."""
    import dataclasses

    import torch.nn.functional as F

    model = build(Case("gpt2", "raw"), hf_root, fresh=True)
    adapter = nm.adapt(model)
    original = adapter.feed_forward

    def relu_instead(layer: int):
        return dataclasses.replace(original(layer), act=F.relu, act_name="relu")

    monkeypatch.setattr(adapter, "feed_forward", relu_instead)
    names = nm.hook_filter(model, "layer_n")
    _, cache = run_with_cache(model, tokens(), names_filter=names)
    with pytest.raises(nm.VerificationError, match=r"activation tl_normmix found .*relu"):
        nm.mixing_maps(model, cache, "layer_n")


def test_tolerance_follows_the_cache_precision():
    assert tolerance(torch.float32) < tolerance(torch.float16) < tolerance(torch.bfloat16)
