"""The model adapter: the only code that knows TransformerLens versions and architectures.

It answers, for a model and its cache, one question per layer: which tensor is the attention
pattern, which are the value vectors, which is the *pure* attention output, which norm reads
which sum with which scale, weight and bias, and how the feed-forward block is built. It hands
the math plain float32 tensors (``LayerTensors``) and a ``BlockSpec``.

Differences are described by data, not scattered branches: a ``_Layout`` maps *roles* to hook
names, one per (TransformerLens generation, block kind). Roles:

============== ==============================================================================
role           meaning (every layer ``l``)
============== ==============================================================================
pattern        ``α^h_ij`` ``[batch, head, query, key]``
v              ``v^h_j`` with ``b_V`` ``[batch, pos, kv_head, d_head]`` (expanded here)
attn_out       pure attention output ``Σ_h Σ_j α v W_O + b_O``, before any norm
mlp_out        pure feed-forward output, before any norm
resid_pre      block input
resid_mid      the stream after the attention part (pre-LN: ``x + attn``; post-LN: ``LN1(x +
               attn)``; sandwich: ``x + LN1post(attn)``); parallel blocks have none
resid_post     block output
mlp_pre        feed-forward pre-activation (gated: the gate branch)
mlp_pre_linear gated feed-forward linear branch
mlp_post       feed-forward hidden activation
{norm}.in      input of norm ``{norm}`` (``ln1``, ``ln2``, ``ln1_post``, ``ln2_post``)
{norm}.scale   its ``hook_scale`` ``[batch, pos, 1]`` (ε included)
{norm}.out     its output, where a hook holds it
============== ==============================================================================

Supported (and tested): GPT-2, BERT, Llama (GQA), GPT-NeoX, Gemma-2 on TransformerLens 4.x
``TransformerBridge`` (raw and compatibility mode); GPT-2-like and Llama-like
``HookedTransformer`` and ``HookedEncoder`` (BERT) on TransformerLens 2.x.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tl_normmix.blocks import BlockKind, BlockSpec, MLPSpec, NormSpec, zeros_if_none

__all__ = [
    "LayerTensors",
    "MissingHookError",
    "ModelAdapter",
    "ModelSpec",
    "UnsupportedModelError",
    "adapt",
]


class UnsupportedModelError(NotImplementedError):
    """The model, or a feature of one of its blocks, is not supported by tl_normmix."""


class MissingHookError(LookupError):
    """The cache lacks hooks a computation needs."""

    def __init__(self, missing: Sequence[str], message: str) -> None:
        super().__init__(message)
        self.missing = tuple(missing)


@dataclass(frozen=True)
class ModelSpec:
    """What the adapter found out about a model."""

    model_name: str
    architecture: str
    tl_version: str
    n_layers: int
    block: BlockSpec
    convention: str  # "raw" or "processed"
    causal: bool = True  # queries attend only to earlier keys (False: BERT)


@dataclass
class LayerTensors:
    """One layer's cached tensors (float32) and weights, by role; see the module docstring."""

    layer: int
    spec: BlockSpec
    hooks: dict[str, Tensor]
    W_O: Tensor  # [head, d_head, d_model]
    b_O: Tensor  # [d_model]
    norms: dict[str, NormSpec] = field(default_factory=dict)
    mlp: MLPSpec | None = None

    def __getitem__(self, role: str) -> Tensor:
        return self.hooks[role]

    @property
    def pattern(self) -> Tensor:
        return self.hooks["pattern"]

    @property
    def v(self) -> Tensor:
        """Value vectors expanded to query heads: ``[batch, pos, head, d_head]`` (METHODS §0)."""
        v = self.hooks["v"]
        return v.repeat_interleave(self.spec.n_heads // v.shape[2], dim=2)

    @property
    def batch(self) -> int:
        return next(iter(self.hooks.values())).shape[0]

    @property
    def pos(self) -> int:
        role, tensor = next(iter(self.hooks.items()))
        return tensor.shape[-1] if role == "pattern" else tensor.shape[1]

    @property
    def device(self) -> torch.device:
        return next(iter(self.hooks.values())).device


@dataclass(frozen=True)
class _Layout:
    """Role -> hook-name template (``{l}`` is the layer)."""

    hooks: Mapping[str, str]

    def name(self, role: str, layer: int) -> str | None:
        template = self.hooks.get(role)
        return template.format(l=layer) if template is not None else None


# ----------------------------------------------------------------------------------------------
# Layouts. TransformerLens 4.x: every norm has hook_in / hook_scale / hook_out; the pure attention
# output is attn.o.hook_out (on BERT and Gemma hook_attn_out is after a norm).
_B = "blocks.{l}."
_TL4_COMMON = {
    "pattern": _B + "attn.hook_pattern",
    "v": _B + "attn.hook_v",
    "attn_out": _B + "attn.o.hook_out",
    "mlp_out": _B + "mlp.hook_out",
    "resid_pre": _B + "hook_resid_pre",
    "resid_post": _B + "hook_resid_post",
    "mlp_pre": _B + "mlp.hook_pre",
    "mlp_pre_linear": _B + "mlp.hook_pre_linear",
    "mlp_post": _B + "mlp.hook_post",
}


def _tl4_norm_hooks(kind: BlockKind) -> dict[str, str]:
    return {
        f"{n}.{part}": _B + f"{n}.hook_{hook}"
        for n in kind.norms
        for part, hook in (("in", "in"), ("scale", "scale"), ("out", "out"))
    }


_TL4_MID = {
    BlockKind.PRE_LN: _B + "hook_resid_mid",
    BlockKind.SANDWICH: _B + "hook_resid_mid",
    BlockKind.POST_LN: _B + "ln1.hook_out",  # TL4 BERT: hook_resid_mid is the pre-LN2 sum
}
_TL4_LAYOUTS = {
    kind: _Layout(
        {
            **_TL4_COMMON,
            **_tl4_norm_hooks(kind),
            **({"resid_mid": _TL4_MID[kind]} if kind in _TL4_MID else {}),
        }
    )
    for kind in BlockKind
}

# TransformerLens 2.x. Norms have hook_scale and hook_normalized; LayerNorm's hook_normalized is
# its output (γ, β included), RMSNorm's is x / s (γ not included), so its output has no hook.
_TL2_PRE_LN = {
    "pattern": _B + "attn.hook_pattern",
    "v": _B + "attn.hook_v",
    "attn_out": _B + "hook_attn_out",
    "mlp_out": _B + "hook_mlp_out",
    "resid_pre": _B + "hook_resid_pre",
    "resid_mid": _B + "hook_resid_mid",
    "resid_post": _B + "hook_resid_post",
    "mlp_pre": _B + "mlp.hook_pre",
    "mlp_pre_linear": _B + "mlp.hook_pre_linear",
    "mlp_post": _B + "mlp.hook_post",
    "ln1.in": _B + "hook_resid_pre",
    "ln1.scale": _B + "ln1.hook_scale",
    "ln2.in": _B + "hook_resid_mid",
    "ln2.scale": _B + "ln2.hook_scale",
}
_TL2_POST_LN = {  # HookedEncoder: hook_resid_post is *before* LN2
    **{k: v for k, v in _TL2_PRE_LN.items() if not k.startswith("mlp_pre_")},
    "resid_mid": _B + "ln1.hook_normalized",
    "resid_post": _B + "hook_normalized_resid_post",
    "ln1.in": _B + "hook_resid_mid",
    "ln1.out": _B + "ln1.hook_normalized",
    "ln2.in": _B + "hook_resid_post",
    "ln2.out": _B + "ln2.hook_normalized",
}

_TL4_ARCHITECTURES = {
    "GPT2LMHeadModel": BlockKind.PRE_LN,
    "LlamaForCausalLM": BlockKind.PRE_LN,
    "GPTNeoXForCausalLM": BlockKind.PARALLEL,  # PRE_LN when use_parallel_residual is False
    "Gemma2ForCausalLM": BlockKind.SANDWICH,
    "BertForMaskedLM": BlockKind.POST_LN,
}


def tl_version() -> str:
    return importlib.metadata.version("transformer_lens")


def adapt(model: Any) -> ModelAdapter:
    """The adapter for ``model``, or ``UnsupportedModelError`` naming what is not supported."""
    return ModelAdapter(model)


def _family(model: Any) -> str:
    names = {c.__name__ for c in type(model).__mro__}
    if "TransformerBridge" in names:
        return "bridge"
    if "HookedEncoder" in names:
        return "encoder"
    if "HookedTransformer" in names:
        return "hooked"
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a TransformerLens model; tl_normmix needs a "
        "TransformerBridge (TransformerLens 4.x) or a HookedTransformer / HookedEncoder (2.x). "
        "Load one with tl_normmix.load_model(...)."
    )


def _processed(model: Any) -> bool:
    if _family(model) == "bridge":
        return bool(getattr(model, "_weights_processed", False))
    return str(model.cfg.normalization_type) in ("LNPre", "RMSPre")


class ModelAdapter:
    """Reads one model's hooks and weights; see the module docstring."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.family = _family(model)
        cfg = model.cfg
        kind, architecture = self._block_kind()
        if self.family == "bridge":
            layout = _TL4_LAYOUTS[kind]
        elif self.family == "encoder":
            layout = _Layout(_TL2_POST_LN)
        else:
            hooks = dict(_TL2_PRE_LN)
            if cfg.normalization_type in ("LN", "LNPre", "RMSPre"):
                hooks |= {
                    "ln1.out": _B + "ln1.hook_normalized",
                    "ln2.out": _B + "ln2.hook_normalized",
                }
            layout = _Layout(hooks)
        self.layout = layout
        n_heads = int(cfg.n_heads)
        block = BlockSpec(
            kind=kind,
            norm_kind="rmsnorm" if str(cfg.normalization_type).startswith("RMS") else "layernorm",
            act_fn=str(cfg.act_fn),
            gated_mlp=bool(getattr(cfg, "gated_mlp", False)),
            n_heads=n_heads,
            n_kv_heads=int(getattr(cfg, "n_key_value_heads", None) or n_heads),
            d_model=int(cfg.d_model),
            d_head=int(cfg.d_head),
        )
        self.spec = ModelSpec(
            model_name=str(getattr(cfg, "model_name", type(model).__name__)),
            architecture=architecture,
            tl_version=tl_version(),
            n_layers=int(cfg.n_layers),
            block=block,
            convention="processed" if _processed(model) else "raw",
            causal=self.family != "encoder"
            and architecture != "BertForMaskedLM"
            and str(getattr(cfg, "attention_dir", "causal")) == "causal",
        )

    # -- description -----------------------------------------------------------------------------
    def _block_kind(self) -> tuple[BlockKind, str]:
        cfg = self.model.cfg
        if self.family == "bridge":
            arch = str(cfg.architecture)
            if arch not in _TL4_ARCHITECTURES:
                raise UnsupportedModelError(
                    f"Architecture {arch!r} ({getattr(cfg, 'model_name', '?')}) is not supported "
                    f"by tl_normmix yet; supported: {', '.join(_TL4_ARCHITECTURES)}."
                )
            kind = _TL4_ARCHITECTURES[arch]
            if kind is BlockKind.PARALLEL and not cfg.parallel_attn_mlp:
                kind = BlockKind.PRE_LN
            return kind, arch
        if self.family == "encoder":
            return BlockKind.POST_LN, "HookedEncoder"
        for flag, feature in (
            ("parallel_attn_mlp", "parallel attention and MLP"),
            ("use_normalization_before_and_after", "sandwich norms"),
            ("attn_only", "attention-only blocks"),
        ):
            if getattr(cfg, flag, None):
                raise UnsupportedModelError(
                    f"{cfg.model_name}: {feature} on a TransformerLens 2.x HookedTransformer "
                    "is not supported; load it as a TransformerLens 4.x TransformerBridge."
                )
        if cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre"):
            raise UnsupportedModelError(
                f"{cfg.model_name}: normalization_type={cfg.normalization_type!r} is not supported."
            )
        return BlockKind.PRE_LN, "HookedTransformer"

    # -- hooks -----------------------------------------------------------------------------------
    def check_layers(self, layers: int | Iterable[int] | None) -> list[int]:
        n = self.spec.n_layers
        if layers is None:
            return list(range(n))
        chosen = [layers] if isinstance(layers, int) else list(layers)
        bad = [layer for layer in chosen if not -n <= int(layer) < n]
        if bad or not chosen:
            raise IndexError(
                f"Layers {bad or chosen} out of range: this model has layers 0..{n - 1}."
            )
        return sorted({int(layer) % n for layer in chosen})

    def hook_names(self, roles: Iterable[str], layers: Iterable[int] | None = None) -> list[str]:
        """The hook names that realise ``roles`` in ``layers`` (default: all)."""
        names = []
        for layer in self.check_layers(list(layers) if layers is not None else None):
            for role in sorted(roles):
                name = self.layout.name(role, layer)
                if name is None:
                    raise UnsupportedModelError(
                        f"{self.spec.model_name} ({self.spec.block.kind.value} blocks, "
                        f"TransformerLens {self.spec.tl_version}) has no {role!r}."
                    )
                names.append(name)
        return names

    def has_role(self, role: str) -> bool:
        return role in self.layout.hooks

    def read(self, cache: Any, layer: int, roles: Iterable[str]) -> LayerTensors:
        """One layer's tensors for ``roles``, checked against the model's shapes, in float32."""
        roles = sorted(roles)
        names = dict(zip(roles, self.hook_names(roles, [layer]), strict=True))
        missing = [name for name in names.values() if not _has(cache, name)]
        if missing:
            raise MissingHookError(
                missing,
                f"The cache lacks {len(missing)} hook(s) needed here: {', '.join(missing)}.",
            )
        hooks = {role: cache[name].detach().float() for role, name in names.items()}
        for role, tensor in hooks.items():
            self._check_shape(role, names[role], tensor)
        return LayerTensors(
            layer=layer,
            spec=self.spec.block,
            hooks=hooks,
            W_O=self.model.blocks[layer].attn.W_O.detach().float(),
            b_O=zeros_if_none(
                self.model.blocks[layer].attn.b_O,
                self.spec.block.d_model,
                next(iter(hooks.values())),
            ),
            norms={n: self.norm(layer, n) for n in self.spec.block.norms if f"{n}.scale" in roles},
            mlp=self.mlp(layer) if any(r.startswith("mlp") for r in roles) else None,
        )

    def _check_shape(self, role: str, name: str, tensor: Tensor) -> None:
        block = self.spec.block
        expected: dict[str, tuple[int | None, ...]] = {
            "pattern": (None, block.n_heads, None, None),
            "v": (None, None, block.n_kv_heads, block.d_head),
        }
        want = expected.get(
            role, (None, None, 1) if role.endswith(".scale") else (None, None, block.d_model)
        )
        if role.startswith("mlp_") and role != "mlp_out":
            want = (None, None, None)
        got = tuple(tensor.shape)
        if len(got) != len(want) or any(
            w is not None and w != g for w, g in zip(want, got, strict=False)
        ):
            raise ValueError(
                f"Cache tensor {name} has shape {list(got)}, but {self.spec.model_name} expects "
                f"{['*' if w is None else w for w in want]}: is this cache from a different model?"
            )

    def str_tokens(self, tokens: Tensor) -> list[list[str]] | None:
        if getattr(self.model, "tokenizer", None) is None:
            return None
        rows = tokens if tokens.ndim == 2 else tokens[None]
        return [list(self.model.to_str_tokens(row)) for row in rows]

    # -- weights ---------------------------------------------------------------------------------
    def norm(self, layer: int, name: str) -> NormSpec:
        """The norm ``name`` of ``layer`` with its effective weight, bias and epsilon."""
        module = getattr(self.model.blocks[layer], name)
        d = self.spec.block.d_model
        kind = self.spec.block.norm_kind
        cls = type(module).__name__
        if self.family == "bridge":
            weight = module.weight
            if weight is None:
                weight = torch.ones(d)
            weight = weight.detach().float()
            if getattr(module, "uses_weight_offset", False):
                weight = 1.0 + weight  # Gemma stores w and applies 1 + w
            bias = getattr(module, "bias", None) if kind == "layernorm" else None
            original = getattr(module, "original_component", None)
            eps = getattr(original, "eps", None) or getattr(original, "variance_epsilon", None)
            eps = float(eps if eps is not None else self.model.cfg.eps)
        else:  # TL 2.x: LayerNorm(w, b), RMSNorm(w), LayerNormPre / RMSNormPre (no parameters)
            weight = module.w.detach().float() if hasattr(module, "w") else torch.ones(d)
            bias = getattr(module, "b", None) if cls == "LayerNorm" else None
            eps = float(module.eps)
        return NormSpec(
            kind=kind,
            weight=weight,
            bias=bias.detach().float() if bias is not None else None,
            eps=eps,
        )

    def mlp(self, layer: int) -> MLPSpec:
        """The feed-forward block of ``layer``."""
        module = self.model.blocks[layer].mlp
        experts = getattr(self.model.cfg, "num_experts", None)
        if experts or not hasattr(module, "W_in"):
            raise UnsupportedModelError(
                f"Layer {layer} of {self.spec.model_name}: the feed-forward block "
                f"({type(module).__name__}{f', {experts} experts' if experts else ''}) is a "
                "mixture of experts or has an unusual structure; whole-layer scopes need a single "
                "MLP `act(u W_in + b_in) W_out + b_out` (or its gated form). Attention-block "
                "scopes still work."
            )
        W_in = module.W_in.detach().float()
        d_mlp, d = W_in.shape[1], self.spec.block.d_model
        W_gate = getattr(module, "W_gate", None) if self.spec.block.gated_mlp else None
        b_gate = getattr(module, "b_gate", None) if W_gate is not None else None
        return MLPSpec(
            act_fn=self.spec.block.act_fn,
            W_in=W_in,
            b_in=zeros_if_none(module.b_in, d_mlp, W_in),
            W_out=module.W_out.detach().float(),
            b_out=zeros_if_none(module.b_out, d, W_in),
            W_gate=W_gate.detach().float() if W_gate is not None else None,
            b_gate=b_gate.detach().float() if b_gate is not None else None,
            bias_after_gate=W_gate is not None and self.family != "bridge",
            act=_activation_module(module),
        )


def _activation_module(mlp: Any) -> Any:
    """The model's own activation callable (used only for activations tl_normmix does not know,
    when the user asks for quadrature)."""
    for owner in (mlp, getattr(mlp, "original_component", None)):
        for attr in ("act_fn", "act", "activation_fn", "intermediate_act_fn"):
            candidate = getattr(owner, attr, None) if owner is not None else None
            if callable(candidate):
                return candidate
    return None


def _has(cache: Any, name: str) -> bool:
    try:
        cache[name]
    except KeyError:
        return False
    return True
