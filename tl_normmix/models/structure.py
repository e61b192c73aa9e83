"""Read a model's block structure from the model itself — never from an architecture name.

TransformerLens 4.x (``TransformerBridge``): per layer, the block bridge's class and its norm
submodules give the layout (``ParallelBlockBridge``: parallel, with ``ln2`` two norms, without one
shared norm; ``ln1_post``/``ln2_post``: norms on the branch outputs — with ``ln1``/``ln2`` a
sandwich, without them norms after the branches only; ``residual_contribution_scale``: the
residual multiplier on both branches; plain ``ln1`` + ``ln2``: pre- *or* post-LN, which nothing in
the model marks — ``models.probe`` decides it from a short run). Each norm's own flags give its
kind (``uses_rms_norm``), ``γ = 1 + w`` (``uses_weight_offset``), missing weight or bias, an
``nn.Identity`` slot and its ε. The MLP bridge's class gives the feed-forward kind (gated, plain,
fused GLU when ``W_in`` is twice as wide as ``W_out`` is tall, mixture of experts), and the HF
module's own activation callables are the candidates the probe checks on a run.

TransformerLens 2.x (``HookedTransformer``, ``HookedEncoder``): the block code is fixed, so the
layout follows from the block's modules and the config switches that build them
(``parallel_attn_mlp``, ``use_normalization_before_and_after``, ``attn_only``, ``gated_mlp``,
``num_experts``, ``normalization_type``).

Anything that cannot be decomposed exactly is refused here with the feature named.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tl_normmix.decompose.activations import ACTIVATIONS
from tl_normmix.decompose.blocks import MULTIPLIER, BlockLayout, NormSpec
from tl_normmix.models.errors import UnsupportedModelError

__all__ = ["Structure", "family", "read_structure"]

_NORM_SLOTS = ("ln1", "ln1_post", "ln2", "ln2_post")


@dataclass(frozen=True)
class Structure:
    """What the model's modules say about its blocks (before any run)."""

    family: str  # "bridge" (TL 4.x), "hooked" (TL 2.x HookedTransformer), "encoder" (HookedEncoder)
    model_name: str
    architecture: str  # for display only: nothing is decided by it
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    layout: BlockLayout
    ambiguous: bool  # plain ln1 + ln2 blocks: pre- or post-LN is decided by a probe run
    multiplier: float | None
    mlp_kind: str | None  # "dense", "gated", "fused_glu", "module", "mixed", None (no FF)
    act_candidates: tuple[tuple[str, Callable[[Tensor], Tensor]], ...] = field(repr=False)
    causal: bool = True
    processed: bool = False
    layer_mlp_kinds: tuple[str | None, ...] = ()  # per layer (DeepSeek: dense first, then MoE)

    def mlp_kind_of(self, layer: int) -> str | None:
        return self.layer_mlp_kinds[layer] if self.layer_mlp_kinds else self.mlp_kind


def family(model: Any) -> str:
    """``bridge``, ``hooked`` or ``encoder``; anything else is refused."""
    names = {c.__name__ for c in type(model).__mro__}
    if "TransformerBridge" in names:
        return "bridge"
    if "HookedEncoder" in names:
        return "encoder"
    if "HookedTransformer" in names:
        return "hooked"
    if "HookedEncoderDecoder" in names:
        raise UnsupportedModelError(
            f"{type(model).__name__}: encoder–decoder models (cross-attention) are not supported "
            "by tl_normmix; it maps the self-attention of decoder-only and encoder-only models."
        )
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a TransformerLens model; tl_normmix needs a "
        "TransformerBridge (TransformerLens 4.x) or a HookedTransformer / HookedEncoder (2.x). "
        "Load one with tl_normmix.load_model(...)."
    )


def read_structure(model: Any) -> Structure:
    """The block structure of ``model`` (see the module docstring), or a refusal naming the
    feature that is not supported."""
    kind = family(model)
    if kind == "bridge":
        return _bridge(model)
    return _hooked(model, kind)


# -- TransformerLens 4.x ------------------------------------------------------------------------
def _classes(obj: Any) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def _name(model: Any) -> str:
    return str(getattr(model.cfg, "model_name", type(model).__name__))


def _refuse(model: Any, feature: str, works: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{_name(model)} ({getattr(model.cfg, 'architecture', '?')}): {feature}. {works}"
    )


def _bridge(model: Any) -> Structure:
    cfg = model.cfg
    if not hasattr(model, "blocks") or any(
        hasattr(model, n) for n in ("encoder_blocks", "decoder_blocks")
    ):
        raise _refuse(
            model,
            "encoder–decoder models (cross-attention from decoder to encoder positions) are not "
            "supported",
            "tl_normmix maps the self-attention of decoder-only and encoder-only models; nothing "
            "of it works on this model yet.",
        )
    shapes = [_block_shape(model, layer, block) for layer, block in enumerate(model.blocks)]
    first = shapes[0]
    for layer, shape in enumerate(shapes):
        if shape[:3] != first[:3]:
            raise _refuse(
                model,
                f"its blocks differ in structure (layer 0: {first[:3]}, layer {layer}: "
                f"{shape[:3]})",
                "tl_normmix needs every block of one layout; nothing of it works on this model.",
            )
    kinds = tuple(shape[3] for shape in shapes)
    if len(set(kinds)) > 1 and None in kinds:
        raise _refuse(
            model,
            "some blocks have a feed-forward part and some do not",
            "Nothing of tl_normmix works on this model yet.",
        )
    mlp_kind = kinds[0] if len(set(kinds)) == 1 else "mixed"
    parallel, norms, multiplier = first[:3]
    layout, ambiguous = _bridge_layout(parallel, norms, multiplier, kinds[0] is not None)
    dense = [layer for layer, kind in enumerate(kinds) if kind not in (None, "module")]
    mlp = model.blocks[dense[0]].mlp if dense else None
    return Structure(
        family="bridge",
        model_name=_name(model),
        architecture=str(getattr(cfg, "architecture", type(model).__name__)),
        n_layers=len(model.blocks),
        n_heads=int(cfg.n_heads),
        d_model=int(cfg.d_model),
        d_head=int(cfg.d_head),
        layout=layout,
        ambiguous=ambiguous,
        multiplier=multiplier,
        mlp_kind=mlp_kind,
        act_candidates=_act_candidates(mlp, str(getattr(cfg, "act_fn", ""))),
        causal=str(getattr(cfg, "attention_dir", "causal")) == "causal",
        processed=bool(getattr(model, "_weights_processed", False)),
        layer_mlp_kinds=kinds,
    )


def _block_shape(
    model: Any, layer: int, block: Any
) -> tuple[bool, tuple[str, ...], float | None, str | None]:
    """``(parallel, norm slots, multiplier, MLP kind)`` of one block bridge."""
    classes = _classes(block)
    subs = dict(getattr(block, "submodules", {}) or {})
    if "attn" not in subs:
        raise _refuse(
            model,
            f"layer {layer} has no attention pattern ({type(block).__name__}: a state-space or "
            "other mixer)",
            "tl_normmix decomposes attention; layers without it cannot be mapped.",
        )
    if "cross_attn" in subs:
        raise _refuse(
            model, "it has cross-attention (an encoder–decoder)", "Nothing of tl_normmix works."
        )
    unknown = [n for n in subs if n not in (*_NORM_SLOTS, "attn", "mlp") and _is_norm(subs[n])]
    if unknown:
        raise _refuse(
            model,
            f"layer {layer} has norms in unexpected places ({', '.join(unknown)})",
            "Nothing of tl_normmix works on this model yet.",
        )
    norms = tuple(n for n in _NORM_SLOTS if n in subs)
    multiplier = getattr(block, "residual_contribution_scale", None)
    multiplier = float(multiplier) if multiplier is not None and multiplier != 1.0 else None
    mlp_kind = _bridge_mlp_kind(subs.get("mlp"))
    return "ParallelBlockBridge" in classes, norms, multiplier, mlp_kind


def _is_norm(module: Any) -> bool:
    return "NormalizationBridge" in _classes(module)


def _bridge_mlp_kind(mlp: Any) -> str | None:
    if mlp is None:
        return None
    classes = _classes(mlp)
    if "MoEBridge" in classes:
        return "module"
    if classes & {"GatedMLPBridge", "JointGateUpMLPBridge"}:
        return "gated"
    try:
        W_in, W_out = mlp.W_in, mlp.W_out
    except AttributeError:
        return "module"
    if W_in is None or W_out is None:
        return "module"
    if W_in.shape[1] == 2 * W_out.shape[0]:  # one projection holds [gated, linear] halves
        return "fused_glu"
    return "dense"


def _bridge_layout(
    parallel: bool, norms: tuple[str, ...], multiplier: float | None, has_mlp: bool
) -> tuple[BlockLayout, bool]:
    has = set(norms)
    scaled = (MULTIPLIER,) if multiplier is not None else ()
    ambiguous = False
    if parallel:
        mlp_in = ("ln2",) if "ln2" in has else ("ln1",)
        layout = BlockLayout(
            parallel=True, attn_in=("ln1",), mlp_in=mlp_in, attn_out=scaled, mlp_out=scaled
        )
    elif has & {"ln1_post", "ln2_post"}:
        layout = BlockLayout(
            attn_in=("ln1",) if "ln1" in has else (),
            attn_out=(*(("ln1_post",) if "ln1_post" in has else ()), *scaled),
            mlp_in=("ln2",) if "ln2" in has else (),
            mlp_out=(*(("ln2_post",) if "ln2_post" in has else ()), *scaled),
            has_mlp=has_mlp,
        )
    else:  # pre-LN until the probe says post-LN
        ambiguous = "ln1" in has and ("ln2" in has or not has_mlp)
        layout = BlockLayout(
            attn_in=("ln1",) if "ln1" in has else (),
            attn_out=scaled,
            mlp_in=("ln2",) if "ln2" in has else (),
            mlp_out=scaled,
            has_mlp=has_mlp,
        )
    return layout, ambiguous


def post_ln(layout: BlockLayout) -> BlockLayout:
    """The post-LN reading of a plain ``ln1`` + ``ln2`` block: ``ln1`` over ``r + attn``, ``ln2``
    over the block output."""
    return BlockLayout(
        attn_out=layout.attn_out,
        mid=("ln1",),
        mlp_out=layout.mlp_out,
        post=("ln2",) if "ln2" in layout.mlp_in else (),
        has_mlp=layout.has_mlp,
    )


def _act_candidates(mlp: Any, act_fn: str) -> tuple[tuple[str, Callable[[Tensor], Tensor]], ...]:
    """The MLP module's own activation callables first, then the known ones (``cfg.act_fn``
    first): the probe keeps the first that reproduces ``hook_post`` from ``hook_pre``."""
    found: list[tuple[str, Callable[[Tensor], Tensor]]] = []
    owners = [mlp, getattr(mlp, "original_component", None)] if mlp is not None else []
    for owner in owners:
        if owner is None:
            continue
        for attr in sorted(dir(owner)):
            if attr.startswith("_") or not ("act" in attr.lower() or "gelu" in attr.lower()):
                continue
            try:
                value = getattr(owner, attr)
            except Exception:
                continue
            is_module = isinstance(value, torch.nn.Module)
            if (is_module and not list(value.parameters())) or (
                callable(value)
                and not is_module
                and not isinstance(value, type | bool)
                and getattr(value, "__self__", None) is None
            ):
                found.append((f"{type(value).__name__} ({type(owner).__name__}.{attr})", value))
    known = sorted(ACTIVATIONS.items(), key=lambda item: item[0] != act_fn)
    return (*found, *known)


# -- TransformerLens 2.x ------------------------------------------------------------------------
def _hooked(model: Any, kind: str) -> Structure:
    cfg = model.cfg
    block = model.blocks[0]
    norm_type = cfg.normalization_type
    has_norm = norm_type is not None
    mlp = getattr(block, "mlp", None)
    if kind == "encoder":
        layout = BlockLayout(mid=("ln1",), post=("ln2",))
    else:
        ln = ("ln1",) if has_norm else ()
        ln2 = ("ln2",) if has_norm and mlp is not None else ()
        if cfg.parallel_attn_mlp:
            layout = BlockLayout(parallel=True, attn_in=ln, mlp_in=ln2)
        elif getattr(cfg, "use_normalization_before_and_after", False):
            layout = BlockLayout(
                attn_in=ln,
                attn_out=("ln1_post",) if has_norm else (),
                mlp_in=ln2,
                mlp_out=("ln2_post",) if has_norm and mlp is not None else (),
                has_mlp=mlp is not None,
            )
        else:
            layout = BlockLayout(attn_in=ln, mlp_in=ln2, has_mlp=mlp is not None)
    if mlp is None:
        mlp_kind = None
    elif getattr(cfg, "num_experts", None) or cfg.is_layer_norm_activation():
        mlp_kind = "module"
    else:
        mlp_kind = "gated" if getattr(cfg, "gated_mlp", False) else "dense"
    act = getattr(mlp, "act_fn", None)
    candidates = ((f"{cfg.act_fn} (TransformerLens)", act),) if callable(act) else ()
    return Structure(
        family=kind,
        model_name=_name(model),
        architecture="HookedEncoder" if kind == "encoder" else "HookedTransformer",
        n_layers=int(cfg.n_layers),
        n_heads=int(cfg.n_heads),
        d_model=int(cfg.d_model),
        d_head=int(cfg.d_head),
        layout=layout,
        ambiguous=False,
        multiplier=None,
        mlp_kind=mlp_kind,
        act_candidates=candidates,
        causal=kind != "encoder" and str(getattr(cfg, "attention_dir", "causal")) == "causal",
        processed=str(norm_type) in ("LNPre", "RMSPre"),
    )


# -- norms ---------------------------------------------------------------------------------------
def norm_spec(model: Any, structure: Structure, layer: int, name: str) -> NormSpec:
    """The norm ``name`` of ``layer`` with its effective weight, bias and ε (``MULTIPLIER``: the
    fixed map ``z ↦ m·z``)."""
    d = structure.d_model
    if name == MULTIPLIER:
        assert structure.multiplier is not None
        return NormSpec("fixed", torch.full((d,), structure.multiplier), None, 0.0)
    module = getattr(model.blocks[layer], name)
    if structure.family == "bridge":
        return _bridge_norm(model, module, d)
    return _hooked_norm(module, d)


def final_norm_spec(model: Any, structure: Structure) -> NormSpec | None:
    """The norm after the last block (``ln_final``), if the model has one."""
    module = getattr(model, "ln_final", None)
    if module is None or isinstance(module, torch.nn.Identity):
        return None
    if structure.family == "bridge":
        return _bridge_norm(model, module, structure.d_model)
    return _hooked_norm(module, structure.d_model)


def _bridge_norm(model: Any, module: Any, d: int) -> NormSpec:
    original = getattr(module, "original_component", None)
    if isinstance(original, torch.nn.Identity):
        return NormSpec("fixed", torch.ones(d), None, 0.0)
    weight = getattr(module, "weight", None)
    weight = torch.ones(d) if weight is None else weight.detach().float()
    if getattr(module, "uses_weight_offset", False):
        weight = 1.0 + weight  # Gemma's and Nemotron's norms store w and apply 1 + w
    rms = bool(getattr(module, "uses_rms_norm", False))
    bias = getattr(original, "bias", None)
    bias = bias.detach().float() if isinstance(bias, Tensor) and not rms else None
    eps = getattr(original, "eps", None)
    if eps is None:
        eps = getattr(original, "variance_epsilon", None)
    if eps is None:
        eps = model.cfg.eps
    return NormSpec("rmsnorm" if rms else "layernorm", weight, bias, float(eps))


def _hooked_norm(module: Any, d: int) -> NormSpec:
    cls = type(module).__name__  # TL 2.x: LayerNorm(w, b), RMSNorm(w), LayerNormPre, RMSNormPre
    weight = module.w.detach().float() if hasattr(module, "w") else torch.ones(d)
    bias = module.b.detach().float() if cls == "LayerNorm" else None
    kind = "rmsnorm" if cls.startswith("RMS") else "layernorm"
    return NormSpec(kind, weight, bias, float(module.eps))
