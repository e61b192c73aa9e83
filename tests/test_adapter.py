"""The model adapter reads the right tensors: identities against the cache.

For every family × mode of the installed TransformerLens (1e-5 relative, float32):
  * Σ_h Σ_j α^h_ij v^h_j W_O^h + b_O equals the pure attention output;
  * each norm's γ ⊙ normalized + β (with the cached scale) equals its output, and the cached
    scale is sqrt(var + ε) (LayerNorm) or sqrt(mean x² + ε) (RMSNorm);
  * act(hook_pre) (gated: act(gate) ⊙ linear) equals hook_post, and the feed-forward block
    rebuilt from its weights on its cached input equals its cached output;
  * the residual stream adds up per block kind, up to the block output.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_rel_close, read_layers
from tiny_models import TL_MAJOR, Case, build, tokens

import tl_normmix as nm
from tl_normmix.blocks import BlockKind


@pytest.fixture
def layers(model):
    return read_layers(model, tokens())


def test_attention_rebuilds_pure_attention_output(layers):
    _, tensors = layers
    for t in tensors:
        out = torch.einsum("bhij,bjhd,hdm->bim", t.pattern, t.v, t.W_O) + t.b_O
        assert_rel_close(out, t["attn_out"], what=f"layer {t.layer} attention")


def test_norms_match_their_outputs_and_scales(layers):
    adapter, tensors = layers
    for t in tensors:
        for name, norm in t.norms.items():
            x, scale = (
                t[f"{name}.in"] if adapter.has_role(f"{name}.in") else None,
                t[f"{name}.scale"],
            )
            centred = x - x.mean(-1, keepdim=True) if norm.kind == "layernorm" else x
            assert_rel_close(
                scale,
                (centred.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt(),
                what=f"{name} scale",
            )
            if adapter.has_role(f"{name}.out"):
                assert_rel_close(
                    norm.apply(x, scale), t[f"{name}.out"], what=f"layer {t.layer} {name}"
                )


def _mlp_input(adapter, t) -> torch.Tensor:
    kind = adapter.spec.block.kind
    reader = "ln1" if kind is BlockKind.POST_LN else "ln2"
    return t.norms[reader].apply(t[f"{reader}.in"], t[f"{reader}.scale"])


def test_mlp_activation_and_weights(layers):
    adapter, tensors = layers
    for t in tensors:
        mlp = t.mlp
        pre_linear = t["mlp_pre_linear"] if mlp.gated else None
        assert_rel_close(mlp.hidden(t["mlp_pre"], pre_linear), t["mlp_post"], what="act(hook_pre)")
        assert_rel_close(t["mlp_post"] @ mlp.W_out + mlp.b_out, t["mlp_out"], what="W_out")
        assert_rel_close(mlp.forward(_mlp_input(adapter, t)), t["mlp_out"], what="FF(u)")


def test_residual_stream_adds_up(layers):
    adapter, tensors = layers
    kind = adapter.spec.block.kind
    for t in tensors:
        pre, attn, mlp = t["resid_pre"], t["attn_out"], t["mlp_out"]

        def norm(name, x, t=t):
            return t.norms[name].apply(x, t[f"{name}.scale"])

        if kind is BlockKind.PRE_LN:
            mid = pre + attn
            post = mid + mlp
        elif kind is BlockKind.POST_LN:
            mid = norm("ln1", pre + attn)
            post = norm("ln2", mid + mlp)
        elif kind is BlockKind.PARALLEL:
            mid, post = None, pre + attn + mlp
        else:
            mid = pre + norm("ln1_post", attn)
            post = mid + norm("ln2_post", mlp)
        if mid is not None:
            assert_rel_close(mid, t["resid_mid"], what=f"layer {t.layer} resid_mid")
        assert_rel_close(post, t["resid_post"], what=f"layer {t.layer} block output")


def test_spec_describes_the_model(case, model):
    spec = nm.adapt(model).spec
    expected_kind = {"bert": "post_ln", "neox": "parallel", "gemma2": "sandwich"}.get(
        case.family, "pre_ln"
    )
    assert spec.block.kind.value == expected_kind
    assert spec.convention == ("processed" if case.mode == "processed" else "raw")
    assert spec.block.n_kv_heads == (2 if case.family in ("llama", "llama_bias", "gemma2") else 4)
    assert spec.block.gated_mlp == (case.family in ("llama", "llama_bias", "gemma2"))


def test_unsupported_architecture_is_named(hf_root):
    if TL_MAJOR >= 4:
        model, expected = build(Case("opt", "raw"), hf_root), "OPTForCausalLM"
    else:
        model, expected = build(Case("parallel", "raw"), hf_root), "parallel attention and MLP"
    with pytest.raises(nm.UnsupportedModelError, match=expected):
        nm.hook_filter(model, "attn_w")


def test_not_a_transformerlens_model():
    with pytest.raises(nm.UnsupportedModelError, match="not a TransformerLens model"):
        nm.adapt(torch.nn.Linear(2, 2))
