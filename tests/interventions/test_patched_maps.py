"""Maps of patched runs: a cache taken under ``model.hooks(...)`` is valid input to
``mixing_maps`` while the stream still adds up, and the self-check refuses it when it does not.

  * patching the residual stream before layer 1 leaves layer 0's maps untouched and changes
    layer 1's, and the maps pass the self-check;
  * zeroing one key/value head's values in layer 1 — where TransformerLens applies the edit —
    zeroes that head's norm-based map (``‖α v W_O‖ = 0``); where it discards the edit, the cached
    values no longer produce the attention output and the self-check raises;
  * overwriting one head's ``hook_z`` (a patch the decomposition cannot express) always raises.
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import tokens

import tl_normmix as nm

N = 6
SCOPE = "attn_n"


def _maps(model, toks, fwd_hooks=()):
    with model.hooks(fwd_hooks=list(fwd_hooks)), torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=nm.hook_filter(model, SCOPE))
    return nm.mixing_maps(model, cache, SCOPE)


SEEN_HEADS: list[int] = []


def _zero_head_0(t, hook):
    t = t.clone()
    if t.shape[1] == N:  # [batch, pos, head, d]
        t[:, :, 0] = 0.0
        SEEN_HEADS.append(t.shape[2])
    else:  # [batch, head, pos, d]
        t[:, 0] = 0.0
        SEEN_HEADS.append(t.shape[1])
    return t


def test_a_residual_patch_changes_only_the_layers_after_it(model):
    toks, other = tokens(2, N, seed=0), tokens(2, N, seed=1)
    with torch.no_grad():
        _, source = model.run_with_cache(other, names_filter="blocks.1.hook_resid_pre")

    def put_back(resid, hook):
        resid = resid.clone()
        resid[:, 2] = source[hook.name][:, 2]
        return resid

    clean = _maps(model, toks)
    patched = _maps(model, toks, [("blocks.1.hook_resid_pre", put_back)])
    d = nm.diff(clean, patched)
    assert float(d[SCOPE][0].abs().max()) == 0.0
    assert float(d[SCOPE][1].abs().max()) > 1e-4
    assert all(e < 1e-3 for errors in patched.verification.values() for e in errors.values())


def test_a_value_patch_is_mapped_or_refused(model):
    toks = tokens(2, N)
    with torch.no_grad():
        plain = model(toks)
        with model.hooks(fwd_hooks=[("blocks.1.attn.hook_v", _zero_head_0)]):
            edited = model(toks)
    if torch.allclose(plain, edited):  # TransformerLens discarded the edit
        with pytest.raises(nm.VerificationError, match="attention output"):
            _maps(model, toks, [("blocks.1.attn.hook_v", _zero_head_0)])
        return
    patched = _maps(model, toks, [("blocks.1.attn.hook_v", _zero_head_0)])
    heads = patched.heads[SCOPE][1]  # [batch, head, query, key]
    group = heads.shape[1] // SEEN_HEADS[-1]  # query heads sharing key/value head 0
    assert float(heads[:, :group].abs().max()) == 0.0
    if group < heads.shape[1]:
        assert float(heads[:, group:].abs().max()) > 0.0


def test_a_patch_the_maps_cannot_express_is_refused(model):
    toks = tokens(2, N)
    with pytest.raises(nm.VerificationError, match="attention output"):
        _maps(model, toks, [("blocks.1.attn.hook_z", _zero_head_0)])
