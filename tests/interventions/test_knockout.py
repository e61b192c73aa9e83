"""Exact token-edge interventions (methods.md#interventions-on-edges): identities on every family of
the installed TransformerLens.

  * removing every source of receiver i in layer l leaves its attention output at b_O (all its
    z^h_i zero);
  * ``remove`` equals zeroing pattern[h, i, j] where the pattern hook is live; ``renormalize``
    equals −∞ on the score;
  * removing column j in all heads equals zeroing hook_v[:, j] (value zeroing);
  * ``patch`` of every source of receiver i equals patching its attention output;
  * batched equals one by one; padded equals unpadded;
  * ``keep_only(all)`` equals the clean run, ``keep_only(none)`` every attention output at b_O;
  * a per-head edit under grouped-query attention touches only its query head;
  * bad input is refused with the reason.
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import TL_MAJOR, Case, build, drops_causal_mask, tokens

import tl_normmix as nm
from tl_normmix.models.editing import editor
from tl_normmix.models.prefix import Prefixes

N = 6


def metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].log_softmax(-1)[:, 5]


_METRIC = metric


def _atol(clean: torch.Tensor) -> float:
    """Effects are differences of two metric values: float32 rounding scales with their size
    (unnormalised models reach log-probabilities of −100)."""
    return 2e-5 * (1.0 + float(clean.abs().max()))


def _run(model, toks, hooks, mask=None):
    with torch.no_grad():
        return metric(editor(model).run(toks, hooks, attention_mask=mask))


def _set_z(layer: int, rows: slice | int, value) -> tuple:
    def hook(z, hook):
        z = z.clone()
        z[:, rows] = value if not callable(value) else value(z[:, rows])
        return z

    return (f"blocks.{layer}.attn.hook_z", hook)


def _all_but(layer: int, receiver: int | None, source: int | None) -> nm.EdgeSet:
    """Every all-head edge except those of one receiver row (or source column) in ``layer``."""
    keep = []
    n_layers = 2
    for at in range(n_layers):
        for i in range(N):
            for j in range(N):
                if at == layer and (i == receiver or j == source):
                    continue
                keep.append(nm.Edge(at, None, i, j))
    return nm.EdgeSet(explicit=tuple(keep))


def test_removing_a_whole_row_leaves_b_O(model):
    toks = tokens(2, N)
    for layer in range(2):
        kept = nm.keep_only(model, toks, _all_but(layer, 3, None), metric)
        assert torch.allclose(kept.clean_check, kept.clean, atol=1e-5)
        direct = _run(model, toks, [_set_z(layer, 3, 0.0)])
        torch.testing.assert_close(kept.value, direct, atol=_atol(direct), rtol=1e-5)


def test_keep_nothing_sets_every_attention_output_to_b_O(model):
    toks = tokens(2, N)
    kept = nm.keep_only(model, toks, nm.EdgeSet(explicit=()), metric)
    direct = _run(model, toks, [_set_z(layer, slice(None), 0.0) for layer in range(2)])
    atol = _atol(direct)
    torch.testing.assert_close(kept.ablated_all, direct, atol=atol, rtol=1e-5)
    torch.testing.assert_close(kept.value, direct, atol=atol, rtol=1e-5)
    torch.testing.assert_close(kept.clean_check, kept.clean, atol=_atol(kept.clean), rtol=1e-5)


def _live(model, hook: str) -> bool:
    """Whether editing ``hook`` in layer 0 changes the output (TransformerLens fires some hooks
    after the fact, where edits are discarded)."""
    toks = tokens(1, N)

    def bump(t, hook):
        return t * 0.5

    return not torch.allclose(_run(model, toks, []), _run(model, toks, [(hook, bump)]))


def test_remove_equals_zeroing_the_pattern_cell(model):
    if not _live(model, "blocks.0.attn.hook_pattern"):
        pytest.skip("pattern edits are discarded by TransformerLens on this bridge")
    toks = tokens(2, N)
    E = nm.edges(layers=[0, 1], heads="each", receivers=[-1], sources=[0, 2])
    ko = nm.knock_out(model, toks, E, metric)
    for index, edge in enumerate(ko.edges):

        def zero(t, hook, edge=edge):
            t = t.clone()
            t[:, edge.head, N - 1, edge.source] = 0.0
            return t

        direct = _run(model, toks, [(f"blocks.{edge.layer}.attn.hook_pattern", zero)]) - ko.clean
        torch.testing.assert_close(ko.effect[index], direct, atol=_atol(ko.clean), rtol=1e-4)


def test_renormalize_equals_minus_infinity_on_the_score(model):
    hook = "blocks.0.attn.hook_attn_scores"
    if hook not in model.hook_dict or not _live(model, hook):
        pytest.skip("score edits are discarded by TransformerLens on this bridge")
    toks = tokens(2, N)
    E = nm.edges(layers=[0, 1], heads="each", receivers=[-1], sources=[1])
    ko = nm.knock_out(model, toks, E, metric, mode="renormalize")
    for index, edge in enumerate(ko.edges):

        def minus_infinity(t, hook, edge=edge):
            t = t.clone()
            t[:, edge.head, N - 1, edge.source] = float("-inf")
            return t

        name = f"blocks.{edge.layer}.attn.hook_attn_scores"
        direct = _run(model, toks, [(name, minus_infinity)]) - ko.clean
        torch.testing.assert_close(ko.effect[index], direct, atol=_atol(ko.clean), rtol=1e-4)


def test_removing_a_column_equals_value_zeroing(model):
    if not _live(model, "blocks.0.attn.hook_v"):
        pytest.skip("value edits are discarded by TransformerLens on this bridge")
    toks = tokens(2, N)
    for layer in range(2):
        kept = nm.keep_only(model, toks, _all_but(layer, None, 2), metric)

        def zero_v(t, hook):
            t = t.clone()
            if t.shape[1] == N:
                t[:, 2] = 0.0
            else:  # the MLA bridge: [batch, head, pos, d_head]
                t[:, :, 2] = 0.0
            return t

        direct = _run(model, toks, [(f"blocks.{layer}.attn.hook_v", zero_v)])
        torch.testing.assert_close(kept.value, direct, atol=_atol(direct), rtol=1e-4)


def test_patching_a_whole_row_equals_patching_the_attention_output(model):
    toks, source = tokens(2, N, seed=1), tokens(2, N, seed=2)
    ed = editor(model)
    cache = {}

    def keep(t, hook):
        cache[hook.name] = t.clone()
        return t

    with torch.no_grad():
        ed.run(source, [(ed.z(1), keep)])
    z_source = next(iter(cache.values()))
    kept = nm.keep_only(model, toks, _all_but(1, 4, None), metric, "patch", source)

    def patch(t, hook):
        t = t.clone()
        t[:, 4] = z_source[:, 4]
        return t

    direct = _run(model, toks, [(ed.z(1), patch)])
    torch.testing.assert_close(kept.value, direct, atol=_atol(direct), rtol=1e-4)


def test_batched_equals_one_by_one(model):
    toks = tokens(2, N, seed=3)
    E = nm.edges(heads="each", receivers=[-1, 2], sources=[0, 1])
    together = nm.knock_out(model, toks, E, metric)
    alone = nm.knock_out(model, toks, E, metric, batch_size=1)
    assert alone.n_forwards > together.n_forwards
    atol = _atol(together.clean)
    torch.testing.assert_close(together.effect, alone.effect, atol=atol, rtol=1e-4, equal_nan=True)


@pytest.mark.parametrize("mode", ["renormalize", "patch", "mean"])
def test_every_mode_runs_and_matches_one_by_one(model, mode):
    toks, source = tokens(2, N, seed=4), tokens(3 if mode == "mean" else 2, N, seed=5)
    E = nm.edges(heads=None, receivers=[-1], sources=[0, 3])
    batched = nm.knock_out(model, toks, E, metric, mode, source_tokens=source)
    single = nm.knock_out(model, toks, E, metric, mode, source_tokens=source, batch_size=1)
    atol = _atol(batched.clean)
    torch.testing.assert_close(batched.effect, single.effect, atol=atol, rtol=1e-4, equal_nan=True)
    assert batched.mode == mode and batched.effect.isfinite().any()


def test_padded_equals_unpadded(model):
    if drops_causal_mask(model):
        pytest.skip("TransformerLens 4.3 runs this model without its causal mask when masked")
    long, short = tokens(1, N, seed=6), tokens(1, 4, seed=7)
    pad = torch.full((1, N - 4), 3)
    padded = torch.cat([long, torch.cat([short, pad], 1)])
    mask = torch.tensor([[1] * N, [1] * 4 + [0] * (N - 4)])

    def last_real(logits, mask=mask):
        rows = torch.arange(logits.shape[0])
        return logits[rows, mask.sum(1) - 1].log_softmax(-1)[:, 5]

    E = nm.edges(heads="each", receivers=[-1], sources=[0, 1, -1])
    ko = nm.knock_out(model, padded, E, last_real, attention_mask=mask)
    alone = nm.knock_out(model, short, E, metric)
    torch.testing.assert_close(ko.effect[:, 1], alone.effect[:, 0], atol=_atol(ko.clean), rtol=1e-4)


#: Causal families whose TransformerLens cache does not reproduce the full forward (MPT's bridge
#: ignores the cache; OpenAI-GPT's has none): knock_out runs them in full.
NO_SHORTCUT = {"mpt", "openai_gpt"}


def _hidden_metric(hidden: torch.Tensor) -> torch.Tensor:
    return hidden[:, 2:].mean(1).norm(dim=-1)  # reads positions before and after the edits


@pytest.mark.parametrize("reads", ["logits", "hidden"])
@pytest.mark.parametrize("mode", ["remove", "renormalize", "patch", "mean"])
def test_the_causal_shortcut_equals_full_forwards(case, model, mode, reads, monkeypatch):
    """Edits from receiver p on re-run only positions p… from the clean keys and values; the
    metric still sees every position (the clean ones before p)."""
    toks, source = tokens(2, N, seed=8), tokens(2, N, seed=9)
    E = nm.edges(heads="each", receivers=[-1, 3], sources=[0, 2, 3])
    metric = _METRIC if reads == "logits" else nm.on_hidden_states(_hidden_metric)
    short = nm.knock_out(model, toks, E, metric, mode, source_tokens=source)
    causal = editor(model).adapter.spec.causal
    assert short.shortcut == (causal and case.family not in NO_SHORTCUT)
    monkeypatch.setattr(Prefixes, "of", classmethod(lambda cls, *args: None))
    full = nm.knock_out(model, toks, E, metric, mode, source_tokens=source)
    assert not full.shortcut
    atol = _atol(full.clean)
    torch.testing.assert_close(short.effect, full.effect, atol=atol, rtol=1e-4, equal_nan=True)
    assert short.effect.isfinite().any()


def test_as_maps_places_each_effect_in_its_cell(model):
    toks = tokens(2, N)
    ko = nm.knock_out(model, toks, nm.edges(layers=[1], heads="each", sources=[0, 1]), metric)
    maps = ko.as_maps()
    per_head = maps.heads["effect"]
    assert per_head.shape == (2, 2, model.cfg.n_heads, N, N)
    for index, edge in enumerate(ko.edges):
        torch.testing.assert_close(per_head[1, :, edge.head, N - 1, edge.source], ko.effect[index])
    assert per_head[0].isnan().all()


@pytest.mark.skipif(TL_MAJOR < 4, reason="the TL 4.x grouped-query tiny Llama")
def test_a_per_head_edit_leaves_its_group_untouched(hf_root):
    model = build(Case("llama", "raw"), hf_root)  # 4 query heads, 2 key-value heads
    toks = tokens(2, N)
    captured = {}

    def keep(t, hook):
        captured["z"] = t.clone()
        return t

    E = nm.edges(layers=[0], heads=[0], receivers=[-1], sources=[1])
    from tl_normmix.interventions.knockout import _EditHook, prepare, resolve_rows

    ed = editor(model)
    inputs = prepare(ed, toks, metric, [0], None)
    edges = E.resolve(2, 4, N)
    hook = _EditHook(ed, "remove", inputs, None, 0, edges, resolve_rows(edges, inputs.mask, True))
    z = inputs.cache[ed.z(0)]
    edited = hook.edit(z, None)
    changed = (edited - z).abs().amax(dim=(0, 1, 3))  # per query head
    assert changed[0] > 0 and (changed[1:] == 0).all()  # head 1 shares head 0's values
    del keep, captured


# -- bad input ----------------------------------------------------------------------------------
def test_bad_input_is_refused(hf_root):
    model = build(Case("gpt2", "raw"), hf_root)
    toks = tokens(2, N)
    E = nm.edges(receivers=[-1], sources=[0])
    with pytest.raises(ValueError, match="one value per batch row"):
        nm.knock_out(model, toks, E, lambda logits: logits[:, -1])
    with pytest.raises(ValueError, match="needs source_tokens"):
        nm.knock_out(model, toks, E, metric, mode="patch")
    with pytest.raises(ValueError, match="same shape"):
        nm.knock_out(model, toks, E, metric, mode="patch", source_tokens=tokens(2, N - 1))
    with pytest.raises(ValueError, match="mode="):
        nm.knock_out(model, toks, E, metric, mode="zero")
    with pytest.raises(IndexError, match="layer 5 out of range"):
        nm.knock_out(model, toks, nm.edges(layers=[5]), metric)
    with pytest.raises(IndexError, match="source 9 out of range"):
        nm.knock_out(model, toks, nm.edges(sources=[9]), metric)
    with pytest.raises(ValueError, match="heads="):
        nm.edges(heads="every")
