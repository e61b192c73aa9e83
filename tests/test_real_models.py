"""Acceptance on the two packaged real models (offline): all-MiniLM-L6-v2 (BERT) and
SmolLM2-135M-Instruct (Llama, GQA 9q/3kv, from a 4-bit GGUF dequantised to float32).

Invariants: the adapter's identities hold on every layer of the real weights (pure attention
output, norms, feed-forward block, residual stream); the known behaviour of each model shows
(SmolLM2 answers " Paris"); and the attention-sink facts measured on EWT sentences hold: the sink
receives most attention weight yet writes vectors far smaller than other tokens'.
"""

from __future__ import annotations

import pytest
import test_adapter
import test_residual
import torch
from helpers import reference
from helpers.checks import assert_rel_close, read_layers
from helpers.data import EWT_DEV, ewt_sentences
from helpers.tiny_models import run_with_cache

import tl_normmix as nm
from tl_normmix.analysis.summary import mixing_ratio_stats, sink_share

pytestmark = pytest.mark.real

SENTENCES = ewt_sentences(10)


@pytest.fixture(scope="module")
def minilm():
    return nm.load_model("all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def smollm2():
    return nm.load_model("SmolLM2-135M")


@pytest.fixture(scope="module", params=["minilm", "smollm2"])
def real(request):
    return request.getfixturevalue(request.param)


EXPECTED = {"minilm": ("post_ln", "dense"), "smollm2": ("pre_ln", "gated")}


@pytest.fixture(scope="module", params=["minilm", "smollm2"])
def named(request):
    return request.param, request.getfixturevalue(request.param)


def test_identities_hold_on_real_weights(named):
    name, real = named
    layout, kind = EXPECTED[name]
    adapter = nm.adapt(real)
    assert (adapter.layout.name, adapter.spec.block.mlp_kind) == (layout, kind)
    layers = read_layers(real, real.to_tokens(SENTENCES[1]))
    test_adapter.test_attention_rebuilds_pure_attention_output(layers)
    test_adapter.test_norms_match_their_outputs_and_scales(layers)
    test_adapter.check_mlp(layers, kind)
    test_adapter.check_residual_stream(layers, layout)


@pytest.mark.parametrize("scope", test_residual.NORM_SCOPES)
def test_completeness_on_real_weights(real, scope):
    """methods.md#residual-and-layer-norm identities on every layer of the real models (attnresln_n:
    LN1 in BERT, LN2 in Llama)."""
    toks = real.to_tokens(SENTENCES[1])
    mask = torch.ones(toks.shape, dtype=torch.bool)
    _, layers = read_layers(real, toks)
    _, cache = run_with_cache(real, toks)
    for t in layers:
        parts, bias = reference.attention_block(t, test_residual.WHICH[scope], mask)
        target = test_residual._target(t, scope, cache)
        assert_rel_close(parts.sum(2) + bias, target, what=f"{scope} layer {t.layer}")


def test_smollm2_is_the_real_model(smollm2):
    spec = nm.adapt(smollm2).spec
    assert (spec.n_layers, spec.block.n_heads, spec.block.n_kv_heads) == (30, 9, 3)
    logits = smollm2(smollm2.to_tokens("The capital of France is"))
    assert smollm2.tokenizer.decode(logits[0, -1].argmax()) == " Paris"


def _sink_stats(model, sink_layers):
    """Per sentence and layer: (sink is the top receiver, sink value norm / others' mean)."""
    out = []
    for sentence in SENTENCES:
        toks = model.to_tokens(sentence)
        names = nm.hook_filter(model, "attn_w", value_norms=True)
        with torch.no_grad():
            _, cache = model.run_with_cache(toks, names_filter=names)
        maps = nm.mixing_maps(model, cache, "attn_w", layers=sink_layers, value_norms=True)
        received = maps["attn_w"][:, 0].mean(-2)  # [layer, key]
        norms = maps.value_norms[:, 0].mean(1)  # [layer, key], mean over heads
        top = received.argmax(-1)
        ratio = norms[:, 0] / norms[:, 1:].mean(-1)
        out.append((top, ratio))
    return out


def test_minilm_cls_sink_writes_little(minilm):
    # Measured on the first 30 EWT dev sentences: in layers 1-4 [CLS] is always the top receiver
    # of attention weight, and its value norm is at most 0.061 of the other tokens' mean.
    for top, ratio in _sink_stats(minilm, [1, 2, 3, 4]):
        assert (top == 0).all()
        assert (ratio < 0.15).all()


def test_smollm2_first_token_sink_writes_little(smollm2):
    # Measured on the first 30 EWT dev sentences: in layers 12-23 the first token is always the
    # top receiver of attention weight, and its value norm is at most 0.44 of the others' mean.
    for top, ratio in _sink_stats(smollm2, list(range(12, 24))):
        assert (top == 0).all()
        assert (ratio < 0.5).all()


SCOPES = ("attn_w", "attn_n", "attnres_w", "attnres_n", "attnresln_n")


def _ewt_stats(model, n_sentences=10):
    """Per layer: mean mixing ratio per scope, sink share by weight and by norm (10 sentences)."""
    names = nm.hook_filter(model, SCOPES)
    ratios, weight, norm = [], [], []
    for text in ewt_sentences(n_sentences):
        with torch.no_grad():
            _, cache = model.run_with_cache(model.to_tokens(text), names_filter=names)
        maps = nm.mixing_maps(model, cache, SCOPES)
        ratios.append(torch.stack([mixing_ratio_stats(maps, s)[:, 0] for s in SCOPES], -1))
        weight.append(sink_share(maps, "attn_w"))
        norm.append(sink_share(maps, "attn_n"))
    return torch.stack(ratios).mean(0), torch.stack(weight).mean(0), torch.stack(norm).mean(0)


def test_minilm_norms_reveal_less_mixing_and_a_silent_sink(minilm):
    # Measured on 200 EWT dev sentences (scripts/real_model_tables.py): mean mixing ratio per
    # layer attn_w 0.92-0.95, attnres_w 0.46-0.47, attnres_n 0.25-0.32, attnresln_n 0.19-0.28;
    # [CLS] gets 0.40-0.54 of the weight in layers 1-5 but 0.05-0.09 by norm (ratio <= 0.17).
    ratios, weight, norm = _ewt_stats(minilm)
    attn_w, _, attnres_w, attnres_n, attnresln_n = ratios.unbind(-1)
    assert (attnresln_n < 0.5 * attn_w).all() and (attnres_n < attnres_w).all()
    assert (weight[1:] > 0.3).all()
    assert (norm[1:] < 0.3 * weight[1:]).all()


def test_smollm2_norms_reveal_less_mixing_and_a_quieter_sink(smollm2):
    # Measured on 200 EWT dev sentences (scripts/real_model_tables.py): mean mixing ratio per
    # layer attn_w 0.69-0.94 vs attnresln_n 0.06-0.29 from layer 2 on; in layers 12-23 the first
    # token gets 0.51-0.90 of the weight and 0.48-0.68 of that by norm.
    ratios, weight, norm = _ewt_stats(smollm2)
    attn_w, attnresln_n = ratios[2:, 0], ratios[2:, 4]
    assert (attnresln_n < 0.5 * attn_w).all()
    assert (weight[12:24] > 0.4).all()
    assert (norm[12:24] < 0.8 * weight[12:24]).all()


WHOLE_LAYER = {
    "post_ln": ("attnresln_n", "attnreslnff_n", "attnreslnffres_n", "attnreslnffresln_n"),
    "pre_ln": ("attnresln_n", "attnreslnff_n", "attnreslnffres_n"),
}


def _whole_layer(model, texts):
    scopes = WHOLE_LAYER[nm.adapt(model).layout.name]
    names = nm.hook_filter(model, scopes)
    for text in texts:
        toks = model.to_tokens(text)
        with torch.no_grad():
            _, cache = model.run_with_cache(toks, names_filter=names)
        yield nm.mixing_maps(model, cache, scopes, tokens=toks)


def test_whole_layer_completeness_on_real_weights(real):
    """Parts + bias terms rebuild the FF output, the stream after RES2 and (BERT) LN2's output on
    every layer: measured worst 3.7e-6 on these sentences (4.7e-6 over 120, SmolLM2 layer 2)."""
    for maps in _whole_layer(real, SENTENCES[:5]):
        for scope, residual in maps.completeness.items():
            assert residual.nan_to_num(0.0).max() < 1e-5, scope


def test_minilm_res2_and_ln2_undo_much_of_the_ff_change(minilm):
    """Kobayashi et al. (2024): the FF changes which tokens mix; RES2 and LN2 largely cancel it.
    Measured over 200 EWT sentences: mean change FF 0.059 vs net 0.034; layer 5: 0.198 vs 0.049."""
    ff, net = [], []
    for maps in _whole_layer(minilm, SENTENCES):
        ff.append(nm.contextualization_change(maps, "attnresln_n", "attnreslnff_n")[:, 0])
        net.append(nm.contextualization_change(maps, "attnresln_n", "attnreslnffresln_n")[:, 0])
    ff_mean, net_mean = torch.stack(ff).mean(0), torch.stack(net).mean(0)
    assert net_mean.mean() < ff_mean.mean()
    assert ff_mean[5] > 2 * net_mean[5]


def test_smollm2_ff_amplifies_the_first_token_in_layer_2(smollm2):
    """Measured: over 200 EWT sentences 7 of layer 2's 10 most FF-amplified pairs read the first
    token; on these 10 sentences its share grows through the FF in each (mean 0.219 → 0.238)."""
    before, after = [], []
    for maps in _whole_layer(smollm2, SENTENCES):
        before.append(sink_share(maps, "attnresln_n")[2])
        after.append(sink_share(maps, "attnreslnff_n")[2])
    assert (torch.stack(after) > torch.stack(before)).all()


def test_smollm2_default_quadrature_reaches_the_float32_floor(smollm2):
    """EWT dev sentence 108 is the worst of 200 for SmolLM2 layer 2's gated FF. Measured FF-output
    residual: 1.5e-5 with 16 Gauss–Legendre points, 4.7e-6 (the float32 floor) with 24 and 32."""
    text = ewt_sentences(109)[108]
    toks = smollm2.to_tokens(text)
    scopes = ("attnreslnff_n",)
    with torch.no_grad():
        _, cache = smollm2.run_with_cache(toks, names_filter=nm.hook_filter(smollm2, scopes))

    def worst(points: int | None) -> float:
        options = nm.FFOptions(quadrature_points=points)
        maps = nm.mixing_maps(smollm2, cache, scopes, layers=[2], options=options)
        return float(maps.completeness["attnreslnff_n"].max())

    assert worst(16) > 1e-5 > worst(None)
    assert worst(None) < worst(16) / 2


# -- interventions (docs: results, maps against interventions) ---------------------------------
SCOPES_KO = ("attn_w", "attn_n")


def _top1_log_prob(model, toks):
    with torch.no_grad():
        top = int(model(toks)[0, -1].argmax())

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, top]

    return metric


def test_smollm2_attribution_ranks_knockouts_better_than_the_maps(smollm2):
    """Measured on 23 prompts (scripts/patching_tables.py): all-head Spearman with the exact
    effects, attribution 0.88–0.98 vs the best map 0.52–0.81, margin ≥ 0.17 on every prompt."""
    toks = smollm2.to_tokens("The capital of France is")
    metric = _top1_log_prob(smollm2, toks)
    _, cache = run_with_cache(smollm2, toks, names_filter=nm.hook_filter(smollm2, SCOPES_KO))
    maps = nm.mixing_maps(smollm2, cache, SCOPES_KO)
    ko = nm.knock_out(smollm2, toks, nm.edges(heads=None), metric)
    att = nm.edge_attribution(smollm2, toks, metric)
    table = nm.agreement([maps, att.as_maps()], ko).table
    rho = table[table.layer == "all"].set_index("scope").spearman
    assert rho["attribution"] > 0.8
    assert rho["attribution"] > max(rho[s] for s in SCOPES_KO) + 0.1
    kept = nm.keep_only(smollm2, toks, nm.edges(heads=None, receivers=None), metric)
    assert abs(float(kept.value[0] - kept.clean[0])) < 1e-4  # keeping every edge is the clean run


# -- corpus analyses (docs: results, corpus) --------------------------------------------------
def test_minilm_corpus_clark_and_kobayashi(minilm, tmp_path):
    """Measured on EWT dev + test (scripts/corpus_tables.py): [CLS] 0.43–0.50 of the weight in
    layers 1–4 but ≤ 0.05 by norm; obj, case, det heads ≥ 0.22 above the best offset."""
    res = nm.corpus.analyse(
        minilm,
        EWT_DEV,
        tmp_path / "run",
        ("attn_w", "attn_n"),
        nm.corpus.CorpusConfig(max_sentences=300, progress=False),
    )
    share = res.special_share("attn_w")
    norm = res.special_share("attn_n")
    for layer in (1, 2, 3, 4):

        def cls(frame, layer=layer):
            rows = frame[(frame.layer == layer) & (frame["head"] == -1) & (frame.kind == "cls")]
            return float(rows.share.iloc[0])

        assert cls(share) > 0.3 and cls(norm) < 0.1
    best = res.best_heads("attn_n").set_index("relation")
    for relation in ("obj", "case", "det"):
        assert best.gain[relation] > 0.1
    assert res.summary().set_index("status").sentences["analysed"] > 290


def test_smollm2_corpus_first_token_by_weight_and_by_norm(smollm2, tmp_path):
    """Measured on EWT dev + test: in the 25 layers where the first token takes 0.45–0.89 of
    the weight (3–9, 12–29) it gets 0.25–0.46 by norm (0.82 in layer 24); in layers 0–2 and
    10–11 it gets ≤ 0.24 of the weight and slightly more by norm."""
    res = nm.corpus.analyse(
        smollm2,
        EWT_DEV,
        tmp_path / "run",
        ("attn_w", "attn_n"),
        nm.corpus.CorpusConfig(max_sentences=150, progress=False),
    )

    def first(scope):
        s = res.special_share(scope)
        return s[(s["head"] == -1) & (s.kind == "first")].set_index("layer").share

    weight, norm = first("attn_w"), first("attn_n")
    sink_layers = [layer for layer in weight.index if weight[layer] > 0.3]
    assert len(sink_layers) >= 20
    assert all(norm[layer] < weight[layer] for layer in sink_layers)
    assert all(weight[layer] < 0.3 for layer in (0, 1, 10, 11))


def test_peer_methods_on_real_weights(real):
    """Issue 13 on real weights: ALTI equals the materialised reference, its resultant is the
    model's; decompose_model is complete at every block; value zeroing equals one forward per
    source on the last layer; run_mixing_maps equals the cached route."""
    import test_value_zeroing

    toks = real.to_tokens(SENTENCES[2])[:, :12]
    _, cache = run_with_cache(real, toks, names_filter=nm.hook_filter(real, ("alti", "layer_n")))
    maps = nm.mixing_maps(real, cache, ("alti", "layer_n"))
    _, layers = read_layers(real, toks)
    mask = torch.ones(toks.shape, dtype=torch.bool)
    for index in (0, len(layers) - 1):
        expected = reference.alti(layers[index], mask)
        assert_rel_close(maps["alti"][index], expected, rtol=1e-4, what=f"alti {index}")
    dm = nm.decompose_model(real, cache)
    assert dm.completeness.max() < 1e-4, dm.completeness.amax(dim=(1, 2))
    last = len(layers) - 1
    vz = nm.value_zeroing(real, toks, layers=[last])
    direct = test_value_zeroing.direct(real, toks, layers=[last])[0]
    torch.testing.assert_close(vz["vz"][0].double(), direct, rtol=1e-3, atol=2e-4)
    streamed = nm.run_mixing_maps(real, toks, ("alti", "layer_n"))
    for scope in ("alti", "layer_n"):
        torch.testing.assert_close(streamed[scope], maps[scope], rtol=1e-6, atol=1e-6)
