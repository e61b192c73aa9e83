"""Rollout (methods.md#the-peers-methods) against explicit matrix products, per scope default and
padding."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers.tiny_models import Case, build, run_with_cache, tokens

import tl_normmix as nm


@pytest.fixture(scope="module")
def bert_maps(tmp_path_factory):
    model = build(Case("bert", "raw"), tmp_path_factory.mktemp("hf"))
    toks = tokens(2, 6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    scopes = ("attn_w", "attn_n", "globenc_n", "alti", "attnres_w")
    _, cache = run_with_cache(model, toks, mask, names_filter=nm.hook_filter(model, scopes))
    return nm.mixing_maps(model, cache, scopes, attention_mask=mask)


def _explicit(maps, scope, identity, normalize, b):
    n = int(maps.mask[b].sum())
    out, current = [], None
    for layer in range(len(maps.layers)):
        m = maps[scope][layer, b, :n, :n].double()
        if identity:
            m = m + torch.eye(n, dtype=torch.float64)
        if normalize:
            m = m / m.sum(-1, keepdim=True)
        current = m if current is None else m @ current
        out.append(current)
    return torch.stack(out)


@pytest.mark.parametrize(
    ("scope", "identity", "normalize"),
    [
        ("attn_w", True, True),
        ("attn_n", True, True),
        ("globenc_n", False, False),
        ("alti", False, False),
        ("attnres_w", False, True),
    ],
)
def test_defaults_are_explicit_products(bert_maps, scope, identity, normalize):
    rolled = nm.rollout(bert_maps, scope)
    assert rolled.dtype == torch.float64
    assert rolled.shape == bert_maps[scope].shape
    for b in range(2):
        n = int(bert_maps.mask[b].sum())
        expected = _explicit(bert_maps, scope, identity, normalize, b)
        assert torch.allclose(rolled[:, b, :n, :n], expected, rtol=1e-12, atol=0)
        assert (rolled[:, b, n:] == 0).all() and (rolled[:, b, :, n:] == 0).all()


def test_attention_rollout_rows_stay_distributions(bert_maps):
    rolled = nm.rollout(bert_maps, "attn_w")
    real = bert_maps.mask
    assert torch.allclose(rolled.sum(-1)[:, real], torch.ones(()).double(), atol=1e-12)


def test_overrides(bert_maps):
    plain = nm.rollout(bert_maps, "attn_w", add_identity=False, normalize=False)
    assert torch.allclose(plain[:, 0], _explicit(bert_maps, "attn_w", False, False, 0))


def test_rollout_needs_consecutive_layers(hf_root):
    model = build(Case("gpt2", "raw"), hf_root)
    _, cache = run_with_cache(model, tokens(1, 5))
    maps = nm.mixing_maps(model, cache, "attn_w")
    gapped = dataclasses.replace(maps, layers=(0, 5))  # as if layers=[0, 5] of a deeper model
    with pytest.raises(ValueError, match="consecutive layers"):
        nm.rollout(gapped, "attn_w")
    with pytest.raises(KeyError, match="was not computed"):
        nm.rollout(maps, "attn_n")
