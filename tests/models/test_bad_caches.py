"""Bad caches get a correct result or a clear error, never silent numbers.

Each case as a new user meets it: a cache made with ``pos_slice`` (refused: it cannot give the
maps), ``remove_batch_dim=True`` (the same maps as the batched cache), ``tokens=`` of another run
(refused), and a padded batch run from a list of strings without ``attention_mask`` (the mask
TransformerLens built is derived from ``tokens=``; without tokens, masked padding is detected and
refused with the fix). On the tiny models and on the real all-MiniLM-L6-v2.
"""

from __future__ import annotations

import pytest
import torch
from helpers.checks import assert_rel_close
from helpers.tiny_models import TL_MAJOR, Case, build, run_with_cache, tokens

import tl_normmix as nm

SCOPES = ("attn_n", "attnres_n")


@pytest.fixture
def gpt2(hf_root):
    return build(Case("gpt2", "raw"), hf_root)


def test_sliced_cache_is_refused(gpt2):
    names = nm.hook_filter(gpt2, SCOPES)
    _, cache = run_with_cache(gpt2, tokens(), names_filter=names, pos_slice=-1)
    with pytest.raises(ValueError, match=r"pos_slice.*re-run"):
        nm.mixing_maps(gpt2, cache, SCOPES)


def test_cache_without_batch_dimension_gives_the_same_maps(gpt2):
    names = nm.hook_filter(gpt2, SCOPES)
    toks = tokens(1, 6)
    _, flat = run_with_cache(gpt2, toks, names_filter=names, remove_batch_dim=True)
    _, batched = run_with_cache(gpt2, toks, names_filter=names)
    for scope in SCOPES:
        assert torch.equal(
            nm.mixing_maps(gpt2, flat, SCOPES)[scope], nm.mixing_maps(gpt2, batched, SCOPES)[scope]
        )


def test_tokens_of_another_run_are_refused(gpt2):
    _, cache = run_with_cache(gpt2, tokens(2, 7), names_filter=nm.hook_filter(gpt2, SCOPES))
    with pytest.raises(ValueError, match=r"tokens has shape \(2, 5\).*pos=7"):
        nm.mixing_maps(gpt2, cache, SCOPES, tokens=tokens(2, 5))


@pytest.fixture(scope="module")
def minilm():
    return nm.load_model("all-MiniLM-L6-v2")


TEXTS = ["A short one.", "A much longer sentence than the first one, with a clause."]


@pytest.mark.real
def test_minilm_sliced_and_flat_caches(minilm):
    toks = minilm.to_tokens("The cat sat on the mat.")
    names = nm.hook_filter(minilm, SCOPES)
    with torch.no_grad():
        _, sliced = minilm.run_with_cache(toks, names_filter=names, pos_slice=-1)
        _, flat = minilm.run_with_cache(toks, names_filter=names, remove_batch_dim=True)
        _, full = minilm.run_with_cache(toks, names_filter=names)
    with pytest.raises(ValueError, match="pos_slice"):
        nm.mixing_maps(minilm, sliced, SCOPES)
    expected = nm.mixing_maps(minilm, full, SCOPES)
    got = nm.mixing_maps(minilm, flat, SCOPES)
    for scope in SCOPES:
        assert torch.equal(got[scope], expected[scope])
    with pytest.raises(ValueError, match="tokens has shape"):
        nm.mixing_maps(minilm, full, SCOPES, tokens=toks[:, :5])


@pytest.mark.real
def test_minilm_padded_batch_without_a_mask(minilm):
    """TransformerLens pads a list of texts and masks the padding of an encoder; without the mask
    the padding would count as tokens. With tokens= the mask is derived as TransformerLens built
    it; without, the masked padding is detected and the fix named."""
    names = nm.hook_filter(minilm, SCOPES)
    with torch.no_grad():
        _, cache = minilm.run_with_cache(TEXTS, names_filter=names)
    toks = minilm.to_tokens(TEXTS)
    with pytest.raises(ValueError, match=r"padded and masked.*attention_mask=mask.*tokens="):
        nm.mixing_maps(minilm, cache, SCOPES)
    derived = nm.mixing_maps(minilm, cache, SCOPES, tokens=toks)
    short = int((toks[0] != minilm.tokenizer.pad_token_id).sum())
    assert derived.mask[0].sum() == short and derived.mask[1].all()
    explicit = nm.mixing_maps(minilm, cache, SCOPES, attention_mask=derived.mask.long())
    alone = nm.mixing_maps(minilm, _cache(minilm, TEXTS[0], names), SCOPES)
    for scope in SCOPES:
        assert torch.equal(derived[scope], explicit[scope])
        assert_rel_close(derived[scope][:, 0, :short, :short], alone[scope][:, 0], rtol=1e-4)
        assert derived.mixing_ratio(scope)[:, 0, short:].isnan().all()


def _cache(model, text, names):
    with torch.no_grad():
        return model.run_with_cache(text, names_filter=names)[1]


@pytest.mark.skipif(TL_MAJOR < 4, reason="a TransformerBridge pads lists of texts")
def test_padded_causal_batch_mask_is_derived_from_tokens(hf_root):
    """A causal model: TransformerLens masks left padding; the mask derived from tokens= equals
    its get_attention_mask, and the real rows equal the unpadded run."""
    model = build(Case("gpt2", "raw"), hf_root, fresh=True)
    model.tokenizer.padding_side = "left"
    texts = ["t10 t11", "t20 t21 t22 t23 t24"]
    names = nm.hook_filter(model, SCOPES)
    with torch.no_grad():
        _, cache = model.run_with_cache(texts, names_filter=names)
    toks = model.to_tokens(texts)
    with pytest.raises(ValueError, match="padded and masked"):
        nm.mixing_maps(model, cache, SCOPES)
    maps = nm.mixing_maps(model, cache, SCOPES, tokens=toks)
    pad = int((~maps.mask[0]).sum())
    assert pad > 0 and maps.mask[1].all()
    alone = nm.mixing_maps(model, _cache(model, texts[0], names), SCOPES)
    for scope in SCOPES:
        assert_rel_close(maps[scope][:, 0, pad:, pad:], alone[scope][:, 0], rtol=1e-4)


def test_single_row_tokens_are_never_treated_as_padding(gpt2):
    """One row is never padded by TransformerLens, even if it ends in the pad id."""
    toks = tokens(1, 6)
    toks[0, -1] = gpt2.tokenizer.pad_token_id if TL_MAJOR >= 4 else 0
    _, cache = run_with_cache(gpt2, toks, names_filter=nm.hook_filter(gpt2, SCOPES))
    assert nm.mixing_maps(gpt2, cache, SCOPES, tokens=toks).mask.all()
