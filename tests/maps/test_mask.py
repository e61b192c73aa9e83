"""A mask or tokens that are not the run's are refused, never used: a key the mask calls padding
but the run attended to (the row, key and weight named), a row with no real token, tokens that are
not an integer tensor — at every public entry point that takes them."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import Case, build, run_with_cache, tokens

import tl_normmix as nm


@pytest.fixture(scope="module")
def bert(hf_root):
    return build(Case("bert", "raw"), hf_root)


def test_a_mask_that_drops_attended_keys_is_refused(bert):
    toks = tokens(1, 8)
    _, cache = run_with_cache(bert, toks, names_filter=nm.hook_filter(bert, "attn_n"))
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, -3:] = 0  # the run was not padded: it attended to these keys
    with pytest.raises(
        ValueError, match=r"marks key [567] of batch row 0 as padding.*query \d+: weight"
    ):
        nm.mixing_maps(bert, cache, "attn_n", attention_mask=mask)
    nm.mixing_maps(bert, cache, "attn_n", attention_mask=torch.ones(1, 8))  # the run's: fine


def test_a_row_without_a_real_token_is_refused(bert):
    toks = tokens(2, 6)
    _, cache = run_with_cache(bert, toks, names_filter=nm.hook_filter(bert, "attn_w"))
    mask = torch.ones(2, 6)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"every token of batch row\(s\) \[1\]"):
        nm.mixing_maps(bert, cache, "attn_w", attention_mask=mask)
    with pytest.raises(ValueError, match=r"only 1 \(token\) and 0"):
        nm.mixing_maps(bert, cache, "attn_w", attention_mask=torch.full((2, 6), 2))


def test_padding_the_run_used_is_accepted(bert):
    toks = tokens(2, 6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    _, cache = run_with_cache(bert, toks, mask, names_filter=nm.hook_filter(bert, "attn_n"))
    maps = nm.mixing_maps(bert, cache, "attn_n", attention_mask=mask)
    assert maps["attn_n"][:, 1, :, 4:].abs().max() == 0


def test_tokens_that_are_not_an_integer_tensor_are_refused_everywhere(hf_root):
    model = build(Case("gpt2", "raw"), hf_root)
    _, cache = run_with_cache(model, tokens(1, 3), names_filter=nm.hook_filter(model, "layer_n"))
    bad = [[1, 2, 3]]

    def metric(logits):
        return logits[:, -1, 0]

    calls = {
        "mixing_maps": lambda: nm.mixing_maps(model, cache, "attn_w", tokens=bad),
        "run_mixing_maps": lambda: nm.run_mixing_maps(model, bad, "attn_w"),
        "value_zeroing": lambda: nm.value_zeroing(model, bad),
        "decompose_model": lambda: nm.decompose_model(model, cache, tokens=bad),
        "knock_out": lambda: nm.knock_out(model, bad, nm.edges(), metric),
        "edge_attribution": lambda: nm.edge_attribution(model, bad, metric),
        "keep_only": lambda: nm.keep_only(model, bad, nm.edges(), metric),
        "faithfulness_curve": lambda: nm.faithfulness_curve(
            model, bad, metric, torch.zeros(2, 1, 3, 3)
        ),
        "float tokens": lambda: nm.run_mixing_maps(model, torch.rand(1, 3), "attn_w"),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=r"\[batch, pos\] \(or \[pos\]\) integer tensor"):
            call()  # refused before any work, whichever entry point: name
        del name
    with pytest.raises(TypeError, match=r"attention_mask must be a \[batch, pos\] tensor"):
        nm.run_mixing_maps(model, tokens(1, 3), "attn_w", attention_mask=[[1, 1, 1]])
    with pytest.raises(TypeError, match="source_tokens must be"):
        nm.knock_out(model, tokens(1, 3), nm.edges(), metric, mode="patch", source_tokens=bad)
