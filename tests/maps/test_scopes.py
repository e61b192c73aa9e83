"""The registry: every method owns its name, description, layouts, roles, heads and options, and
the engine needs nothing else. Each entry is checked against the layouts it claims (refused with
the reason elsewhere, computed where it applies), and the options reach its kernel."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers.tiny_models import Case, build, run_with_cache, tokens

import tl_normmix as nm
from tl_normmix.decompose.blocks import BlockLayout
from tl_normmix.maps.method import LAYOUTS, UnsupportedScopeError


def test_every_scope_is_listed_once_with_what_it_owns():
    methods = nm.list_scopes()
    names = [m.name for m in methods]
    assert len(names) == len(set(names)) == len(nm.SCOPES)
    assert names[:5] == ["attn_w", "attn_n", "attnres_w", "attnres_n", "attnresln_n"]
    for m in methods:
        assert m.description and m.docs.startswith("methods.md#")
        assert set(m.layouts()) == set(LAYOUTS)
        if m.options is not None:
            assert dataclasses.is_dataclass(m.default_options())
    assert all(m.kernel is not None for m in methods)
    per_head = {m.name for m in methods if m.has_heads}
    assert per_head == {"attn_w", "attn_n", "alti"}
    assert nm.SCOPES["alti"].options is nm.AltiOptions
    assert nm.SCOPES["layer_n"].options is nm.FFOptions


def test_layouts_match_the_refusals():
    """Each method's ``layouts()`` agrees with the error ``check_layout`` raises."""
    for m in nm.list_scopes():
        for name, reason in m.layouts().items():
            layout = LAYOUTS[name]
            if reason is not None:
                with pytest.raises(UnsupportedScopeError):
                    m.check_layout(layout)
            else:
                m.check_layout(layout)
                assert m.roles(layout)
    assert nm.SCOPES["globenc_n"].layouts()["pre_ln"] is not None
    assert nm.SCOPES["globenc_n"].layouts()["post_ln"] is None
    assert "no norm follows" in nm.SCOPES["attnreslnffresln_n"].layouts()["pre_ln"]
    assert nm.SCOPES["attnresln_n"].layouts()["parallel"] is not None


def test_value_zeroing_from_a_cache_equals_its_entry_point(hf_root):
    """``vz`` is a method of the registry: ``mixing_maps`` computes it from a cache of its hooks,
    as ``nm.value_zeroing`` does from tokens, with its own options."""
    assert nm.SCOPES["vz"].options is nm.ValueZeroingOptions
    model = build(Case("gpt2", "raw"), hf_root)
    toks = tokens(1, 6)
    _, cache = run_with_cache(model, toks, names_filter=nm.hook_filter(model, ("vz", "attn_w")))
    maps = nm.mixing_maps(model, cache, ("attn_w", "vz"), progress=False)
    direct = nm.value_zeroing(model, toks, progress=False)
    torch.testing.assert_close(maps["vz"], direct["vz"])
    last = nm.mixing_maps(model, cache, "vz", options=nm.ValueZeroingOptions(final_norm_last=True))
    assert not torch.allclose(last["vz"][-1], maps["vz"][-1])
    torch.testing.assert_close(last["vz"][:-1], maps["vz"][:-1])


def test_options_reach_the_method_and_are_refused_where_no_scope_takes_them(hf_root):
    model = build(Case("gpt2", "raw"), hf_root)
    toks = tokens(1, 6)
    _, cache = run_with_cache(model, toks, names_filter=nm.hook_filter(model, ("alti", "layer_n")))
    plain = nm.mixing_maps(model, cache, "alti")
    offset = nm.mixing_maps(model, cache, "alti", options=nm.AltiOptions(eps=1e-2))
    assert not torch.allclose(plain["alti"], offset["alti"])
    both = nm.mixing_maps(
        model,
        cache,
        ("alti", "layer_n"),
        options=(nm.AltiOptions(eps=1e-2), nm.FFOptions(chunk_size=2)),
    )
    torch.testing.assert_close(both["alti"], offset["alti"])
    with pytest.raises(TypeError, match="none of which is requested"):
        nm.mixing_maps(model, cache, "alti", options=nm.FFOptions(chunk_size=2))
    with pytest.raises(ValueError, match="Two AltiOptions"):
        nm.mixing_maps(model, cache, "alti", options=(nm.AltiOptions(), nm.AltiOptions()))
    with pytest.raises(ValueError, match="value_bias"):
        nm.AltiOptions(value_bias="elsewhere")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        nm.FFOptions(chunk_size=0)


def test_a_new_method_needs_only_its_entry(hf_root, monkeypatch):
    """A method registered with its own kernel is computed, refused and listed like the others:
    the engine reads everything from the entry."""
    from tl_normmix.decompose.blocks import Stage
    from tl_normmix.maps import scopes
    from tl_normmix.maps.method import KernelOutput, Method

    def kernel(layer, methods, options):
        assert layer.pattern is not None
        out = KernelOutput()
        for name in methods:
            out.maps[name] = layer.pattern.amax(dim=1) * options[name].scale
            out.ratios[name] = out.maps[name].sum(-1)
        return out

    @dataclasses.dataclass(frozen=True)
    class MaxOptions:
        scale: float = 1.0

    def only_pre_ln(layout: BlockLayout) -> str | None:
        return None if layout.name == "pre_ln" else "a test method for pre-LN blocks only"

    entry = Method(
        "attn_max",
        "the largest weight over heads",
        "methods.md#test",
        Stage.WEIGHTS,
        kernel,
        check="none",
        options=MaxOptions,
        refuse=only_pre_ln,
    )
    monkeypatch.setitem(scopes.SCOPES, "attn_max", entry)
    model = build(Case("gpt2", "raw"), hf_root)
    _, cache = run_with_cache(model, tokens(1, 5), names_filter=nm.hook_filter(model, "attn_max"))
    maps = nm.mixing_maps(model, cache, "attn_max", options=MaxOptions(scale=2.0))
    pattern = torch.stack([cache[f"blocks.{i}.attn.hook_pattern"] for i in range(2)])
    torch.testing.assert_close(maps["attn_max"], 2.0 * pattern.amax(dim=2))
    assert "attn_max" in [m.name for m in nm.list_scopes()]
    bert = build(Case("bert", "raw"), hf_root)
    with pytest.raises(UnsupportedScopeError, match="pre-LN blocks only"):
        nm.hook_filter(bert, "attn_max")
