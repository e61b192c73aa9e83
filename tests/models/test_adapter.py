"""The model adapter reads the right tensors and the right structure: identities against the cache.

For every family × mode of the installed TransformerLens (1e-5 relative, float32):
  * Σ_h Σ_j α^h_ij v^h_j W_O^h + b_O equals the pure attention output;
  * each norm's γ ⊙ normalized + β (with the cached scale) equals its output, and the cached
    scale is sqrt(var + ε) (LayerNorm) or sqrt(mean x² + ε) (RMSNorm) of its cached input;
  * act(hook_pre) (gated: act(gate) ⊙ linear; fused GLU: act(first half) ⊙ second half) equals
    hook_post with the activation found on the model, and the feed-forward block rebuilt from its
    weights (or the model's own module) on its cached input equals its cached output;
  * the residual stream adds up as the family's layout says (the test's own equations per layout,
    not the library's);
  * the structure found (layout, feed-forward kind, convention, direction) is the expected one, and
    what cannot be decomposed is refused with the feature named.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers.checks import assert_rel_close, read_layers
from helpers.tiny_models import (
    FAMILIES,
    REFUSED,
    TL_MAJOR,
    Case,
    build,
    convention_of,
    layout_of,
    mlp_of,
    tokens,
)

import tl_normmix as nm
from tl_normmix.decompose.blocks import MLPSpec


@pytest.fixture
def layers(model):
    return read_layers(model, tokens())


def test_attention_rebuilds_pure_attention_output(layers):
    _, tensors = layers
    for t in tensors:
        out = torch.einsum("bhij,bjhd,hdm->bim", t.pattern, t.v, t.W_O) + t.b_O
        assert_rel_close(out, t["attn_out"], what=f"layer {t.layer} attention")


def test_norms_match_their_outputs_and_scales(layers):
    _, tensors = layers
    for t in tensors:
        for name, norm in t.norms.items():
            if f"{name}.in" not in t:
                continue
            x, scale = t[f"{name}.in"], t.scale(name)
            if norm.kind != "fixed":
                centred = x - x.mean(-1, keepdim=True) if norm.kind == "layernorm" else x
                expected = (centred.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
                assert_rel_close(scale, expected, what=f"{name} scale")
            if f"{name}.out" in t:
                assert_rel_close(
                    norm.apply(x, scale), t[f"{name}.out"], what=f"layer {t.layer} {name}"
                )


def test_mlp_activation_and_weights(case, layers):
    check_mlp(layers, mlp_of(case))


def check_mlp(layers, kind: str | None) -> None:
    _, tensors = layers
    for t in tensors:
        mlp = t.mlp
        if mlp is None:
            assert kind is None
            continue
        if isinstance(mlp, MLPSpec) and "mlp_pre" in t:
            pre = t["mlp_pre"]
            if kind == "fused_glu":  # hook_pre holds [gated, linear]
                hidden = mlp.hidden(*pre.chunk(2, dim=-1))
            else:
                hidden = mlp.hidden(pre, t["mlp_pre_linear"] if mlp.gated else None)
            assert_rel_close(hidden, t["mlp_post"], what="act(hook_pre)")
            assert_rel_close(t["mlp_post"] @ mlp.W_out + mlp.b_out, t["mlp_out"], what="W_out")
        if "mlp_in" in t:
            assert_rel_close(mlp.forward(t["mlp_in"]), t["mlp_out"], what="FF(u)")


def _residual_multiplier(case: Case) -> float:
    return (
        float(FAMILIES[case.family].config.get("residual_multiplier", 1.0))
        if TL_MAJOR >= 4
        else 1.0
    )


def test_residual_stream_adds_up(case, layers):
    """The block output from its parts, by the test's own equations for each layout."""
    check_residual_stream(layers, layout_of(case), _residual_multiplier(case))


def check_residual_stream(layers, name: str, m: float = 1.0) -> None:
    _, tensors = layers
    for t in tensors:
        r, attn = t["resid_pre"], t["attn_out"]
        mlp = t.get("mlp_out")

        def out(norm, x, t=t):
            if f"{norm}.out" in t:
                return t[f"{norm}.out"]
            return t.norms[norm].apply(x, t.scale(norm))

        if name in ("pre_ln", "parallel", "parallel_shared_norm", "pre_ln_scaled", "unnormalised"):
            post = r + m * attn + m * mlp
            if not name.startswith("parallel") and "ln2.in" in t:
                assert_rel_close(t["ln2.in"], r + m * attn, what="resid_mid")
        elif name == "pre_ln_attention_only":
            post = r + attn
        elif name == "post_ln":
            assert_rel_close(t["ln1.in"], r + attn, what="ln1 reads r + attn")
            mid = out("ln1", r + attn)
            post = out("ln2", mid + mlp)
        elif name in ("sandwich", "post_branch_norms"):
            attn_written = out("ln1_post", attn)
            post = r + attn_written + out("ln2_post", mlp)
        else:
            raise AssertionError(f"no equation for {name}")
        assert_rel_close(post, t["resid_post"], what=f"layer {t.layer} block output ({name})")


def test_spec_describes_the_model(case, model):
    spec = nm.adapt(model).spec
    assert spec.block.layout.name == layout_of(case)
    assert spec.block.mlp_kind == mlp_of(case)
    assert spec.convention == convention_of(case)
    assert spec.causal == case.causal


@pytest.mark.skipif(TL_MAJOR < 4, reason="TransformerLens 4.x bridges")
@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon", "openai_gpt"])
def test_activation_is_read_from_the_model_not_from_cfg(family, hf_root):
    """cfg.act_fn says relu on these bridges; the model computes a GELU, which the probe finds."""
    model = build(Case(family, "raw"), hf_root)
    assert model.cfg.act_fn == "relu"
    spec = nm.adapt(model).spec
    assert "gelu" in spec.activation.lower(), spec.activation


@pytest.mark.skipif(TL_MAJOR < 4, reason="TransformerLens 4.x bridges")
@pytest.mark.parametrize("family", ["opt_post", "openai_gpt"])
def test_post_ln_without_any_marker_is_found_by_the_probe(family, hf_root):
    model = build(Case(family, "raw"), hf_root)
    adapter = nm.adapt(model)
    assert adapter.structure.ambiguous  # nothing in the classes or config says post-LN
    assert adapter.probe.post_ln
    assert adapter.layout.mid == ("ln1",) and adapter.layout.post == ("ln2",)


@pytest.mark.skipif(TL_MAJOR < 4, reason="TransformerLens 4.x bridges")
def test_hooks_that_break_the_run_are_found_and_avoided(hf_root):
    """OPT-350m: caching ln2.hook_in / hook_out makes TransformerLens's run fail; the probe finds
    them, hook_filter never asks for them and the post-norm input is rebuilt instead."""
    model = build(Case("opt_post", "raw"), hf_root)
    adapter = nm.adapt(model)
    assert {"ln2.hook_in", "ln2.hook_out"} <= adapter.probe.broken
    names = nm.hook_filter(model, "layer_n").hook_names
    assert not any(n.endswith(tuple(adapter.probe.broken)) for n in names)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens(), names_filter=lambda n: n in names)
    maps = nm.mixing_maps(model, cache, "layer_n")
    assert maps.completeness["layer_n"].max() < 1e-5


@pytest.mark.skipif(TL_MAJOR < 4, reason="TransformerLens 4.x bridges")
@pytest.mark.parametrize("family", REFUSED)
def test_refusals_name_the_feature(family, hf_root):
    from helpers.tiny_models import save_hf_folder
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TransformerBridge.boot_transformers(str(save_hf_folder(family, hf_root)))
    with pytest.raises(nm.UnsupportedModelError, match=FAMILIES[family].refused):
        nm.hook_filter(model, "attn_w")


@pytest.mark.skipif(TL_MAJOR < 4, reason="TransformerLens 4.x bridges")
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_compatibility_mode_on_a_mixture_of_experts_warns(family, hf_root):
    """TransformerLens's processing changes some MoE models (Qwen2-MoE, GPT-OSS): say so."""
    model = build(Case(family, "processed"), hf_root, fresh=True)
    with pytest.warns(UserWarning, match="changes some mixture-of-experts models"):
        nm.adapt(model)
    raw = build(Case(family, "raw"), hf_root, fresh=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nm.adapt(raw)


def test_not_a_transformerlens_model():
    with pytest.raises(nm.UnsupportedModelError, match="not a TransformerLens model"):
        nm.adapt(torch.nn.Linear(2, 2))


def test_adapter_is_built_once_per_model(model):
    assert nm.adapt(model) is nm.adapt(model)
