"""Value zeroing (methods.md#the-peers-methods) against one forward per (layer, source), on every
family and mode.

* the block's tail as a function (norms with recomputed scales, the feed-forward block) rebuilds
  the block output from its input and the attention output;
* ``value_zeroing`` equals running the model once per (layer, source) with that source's values
  zeroed in every head (``hook_v`` where TransformerLens lets the edit through, else the same
  removal on ``hook_z``) and scoring the layer's block output, with and without padding;
* the folded tail (``PairForm``: the removal carried through the norms as an affine form) equals
  the removal written out per pair, for arbitrary weights, and chunks of one source change nothing;
* ``final_norm_last`` scores the last layer after the model's own final norm; bad requests are
  refused with what to do.
"""

from __future__ import annotations

import pytest
import torch
from helpers.checks import assert_rel_close, read_layers
from helpers.tiny_models import Case, build, drops_causal_mask, run_with_cache, tokens

import tl_normmix as nm
from tl_normmix import memory
from tl_normmix.decompose import attention, block_tail
from tl_normmix.decompose.block_tail import RemovalTail, block_output, parallel_branch
from tl_normmix.decompose.blocks import MLPSpec
from tl_normmix.models.editing import editor

N = 5


def test_block_tail_rebuilds_the_block_output(model):
    _, layers = read_layers(model, tokens())
    for t in layers:
        resid = t["resid_pre"]
        y = block_output(t, resid, t["attn_out"], parallel_branch(t, resid))
        assert_rel_close(y, t["resid_post"], what=f"layer {t.layer}")


def test_folded_tail_equals_the_written_out_removal(model, monkeypatch):
    """Random weights (large removals, every pair touched) through every layer's tail; the fold
    must be the path taken wherever the block is sequential with a per-unit feed-forward block."""
    forms = []
    real_removal = block_tail.PairForm.removal
    monkeypatch.setattr(
        block_tail.PairForm,
        "removal",
        lambda *a: forms.append(1) or real_removal(*a),
    )
    _, layers = read_layers(model, tokens(2, N, seed=5))
    generator = torch.Generator().manual_seed(0)
    expected_folds = 0
    for t in layers:
        resid, attn = t["resid_pre"], t["attn_out"]
        f = attention.source_vectors(t.v, t.W_O)
        weights = torch.rand(2, N, N, t.block.n_heads, generator=generator)
        branch = parallel_branch(t, resid)
        folded = RemovalTail(t, resid, attn, f, branch)
        written = RemovalTail(t, resid, attn, f, branch, fold=False)
        for receivers, sources in ((slice(None), slice(None)), (slice(2, None), slice(1, 3))):
            w = weights[:, sources, receivers]
            assert_rel_close(
                folded.outputs(w, receivers, sources),
                written.outputs(w, receivers, sources),
                what=f"layer {t.layer}",
            )
        layout = t.layout
        expected_folds += not layout.parallel and layout.has_mlp and isinstance(t.mlp, MLPSpec)
    assert len(forms) == expected_folds


def test_chunks_of_one_source_change_nothing(monkeypatch, hf_root):
    toks = tokens(2, N, seed=7)
    for case in (Case("gpt2", "raw"), Case("bert", "raw"), Case("llama", "raw")):
        model = build(case, hf_root)
        whole = nm.value_zeroing(model, toks)["vz"]
        with monkeypatch.context() as m:
            m.setattr(memory, "CACHE_BLOCK_BYTES", 0)
            single = nm.value_zeroing(model, toks)["vz"]
        torch.testing.assert_close(single, whole, rtol=1e-5, atol=1e-6)


def _block_output(model, toks, layer, hooks, mask):
    adapter = nm.adapt(model)
    names = set(adapter.hook_names({"resid_post"}, [layer]))
    with model.hooks(fwd_hooks=hooks):
        _, cache = run_with_cache(model, toks, mask, names_filter=lambda n: n in names)
    return adapter.read(cache, layer, {"resid_post"})["resid_post"].double()


def _zero_v(j, n):
    def hook(v, hook):
        v = v.clone()
        if v.shape[1] == n:
            v[:, j] = 0.0
        else:  # the MLA bridge: [batch, head, pos, d_head]
            v[:, :, j] = 0.0
        return v

    return hook


def _remove_on_z(pattern, v, j):
    """z^h_i − α^h_ij v^h_j: the same removal where TransformerLens discards value edits."""

    def hook(z, hook):
        return z - torch.einsum("bhi,bhd->bihd", pattern[:, :, :, j], v[:, j]).to(z.dtype)

    return hook


def _v_is_live(model, toks, mask):
    clean = _block_output(model, toks, 0, [], mask)
    halved = _block_output(
        model, toks, 0, [("blocks.0.attn.hook_v", lambda v, hook: v * 0.5)], mask
    )
    return not torch.allclose(clean, halved)


def direct(model, toks, mask=None, final=None, layers=None):
    """One forward per (layer, source): ``[layer, batch, query, key]`` row-normalised scores."""
    adapter = nm.adapt(model)
    n = toks.shape[1]
    real = mask.bool() if mask is not None else torch.ones(toks.shape, dtype=torch.bool)
    _, layers = read_layers(model, toks, layers, mask=mask)
    live = _v_is_live(model, toks, mask)
    out = []
    for t in layers:
        layer = t.layer
        clean = _block_output(model, toks, layer, [], mask)
        if final is not None and layer == adapter.spec.n_layers - 1:
            clean = final(clean)
        pattern = t.pattern.masked_fill(~(real[:, None, :, None] & real[:, None, None, :]), 0)
        v = editor(model).v_heads(t.hooks["v"]) if "v" in t.hooks else t.v
        scores = torch.zeros(toks.shape[0], n, n, dtype=torch.float64)
        for j in range(n):
            if live:
                hook = (f"blocks.{layer}.attn.hook_v", _zero_v(j, n))
            else:
                hook = (f"blocks.{layer}.attn.hook_z", _remove_on_z(pattern, t.v, j))
            edited = _block_output(model, toks, layer, [hook], mask)
            if final is not None and layer == adapter.spec.n_layers - 1:
                edited = final(edited)
            scores[:, :, j] = 1 - torch.nn.functional.cosine_similarity(edited, clean, dim=-1)
        del v
        scores = scores.masked_fill(~(real[:, :, None] & real[:, None, :]), 0.0)
        out.append(scores / scores.sum(-1, keepdim=True).clamp_min(1e-300))
    return torch.stack(out)


def test_equals_one_forward_per_source(case, model):
    """Unpadded on every family and mode; padded too on the raw models."""
    padding = [None]
    if case.mode == "raw" and not drops_causal_mask(model):  # OpenAI-GPT: see test_residual
        padding.append(torch.tensor([[1] * N, [1] * 3 + [0] * 2]))
    for mask in padding:
        _check_against_direct(model, mask)


def _check_against_direct(model, mask):
    toks = tokens(2, N, seed=4)
    vz = nm.value_zeroing(model, toks, attention_mask=mask)
    expected = direct(model, toks, mask)
    real = mask.bool() if mask is not None else torch.ones(toks.shape, dtype=torch.bool)
    assert vz["vz"].shape == expected.shape
    # 1 − cos of nearly parallel vectors: float32 leaves ~1e-7 absolute on each score
    torch.testing.assert_close(vz["vz"].double(), expected, rtol=1e-3, atol=2e-4)
    assert torch.allclose(vz["vz"].sum(-1)[:, real].double(), torch.ones(()).double(), atol=1e-5)
    assert vz.mixing_ratio("vz")[:, ~real].isnan().all()


def test_final_norm_last(hf_root):
    model = build(Case("gpt2", "raw"), hf_root)
    toks = tokens(2, N, seed=6)
    vz = nm.value_zeroing(model, toks, final_norm_last=True)
    with torch.no_grad():
        expected = direct(model, toks, final=lambda y: model.ln_final(y.float()).double())
    torch.testing.assert_close(vz["vz"].double(), expected, rtol=1e-3, atol=2e-4)
    plain = nm.value_zeroing(model, toks, layers=[1])
    assert not torch.allclose(plain["vz"][0], vz["vz"][1])


def test_refusals(hf_root):
    encoder = build(Case("bert", "raw"), hf_root)  # its ln_final is the MLM head's norm
    with pytest.raises(ValueError, match="already normalised"):
        nm.value_zeroing(encoder, tokens(1, N), final_norm_last=True)
    _, cache = run_with_cache(encoder, tokens(1, N), names_filter=nm.hook_filter(encoder, "vz"))
    options = nm.ValueZeroingOptions(final_norm_last=True)
    with pytest.raises(ValueError, match="already normalised"):
        nm.mixing_maps(encoder, cache, "vz", options=options)
