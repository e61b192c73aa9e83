"""A TransformerLens-free description of one transformer block, and one layer's tensors.

The model adapter (``tl_normmix.models``) fills these from a model and its cache; the math reads
them. They say *what* a block computes (methods.md#notation): which linear maps and norms sit on
each branch, whether the branches run in sequence or in parallel, and how the feed-forward block is
built. No hook names and no TransformerLens types appear here.

Every block of the architectures TransformerLens supports is one ``BlockLayout``: a sequence of
*chains* of linear maps — norms linearised with their cached scale (methods.md#notation), the
residual multiplier (Granite) as a fixed map — around the two branches::

    sequential:  h = mid(r + attn_out(A(attn_in(r))));  y = post(h + mlp_out(FF(mlp_in(h))))
    parallel:    y = post(r + attn_out(A(attn_in(r))) + mlp_out(FF(mlp_in(r))))

=================================== =========== ========= ====== ========= ========== ======
layout                              attn_in     attn_out  mid    mlp_in    mlp_out    post
=================================== =========== ========= ====== ========= ========== ======
pre-LN (GPT-2, Llama, Qwen, OPT)    ln1         –         –      ln2       –          –
post-LN (BERT, RoBERTa, OPT-350m)   –           –         ln1    –         –          ln2
parallel, two norms (NeoX)          ln1         –         –      ln2       –          –
parallel, one norm (GPT-J, Phi)     ln1         –         –      ln1       –          –
sandwich (Gemma-2/3)                ln1         ln1_post  –      ln2       ln2_post   –
norms after the branches (OLMo-2)   –           ln1_post  –      –         ln2_post   –
pre-LN with a multiplier (Granite)  ln1         m         –      ln2       m          –
=================================== =========== ========= ====== ========= ========== ======

``attn_in`` is inside ``f^h(x_j)`` (it depends on token ``j`` alone) and is only checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from enum import Enum

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "MULTIPLIER",
    "BlockLayout",
    "BlockSpec",
    "FFModule",
    "FeedForward",
    "LayerTensors",
    "MLPSpec",
    "NormSpec",
    "Router",
    "Stage",
    "zeros_if_none",
]

#: The name of the residual multiplier (Granite) in a layout's chains: a fixed map ``z ↦ m·z``.
MULTIPLIER = "residual_multiplier"


@dataclass(frozen=True)
class NormSpec:
    """A norm with its effective weight ``γ`` (``1 + w`` already resolved) and bias ``β``.

    ``kind``: ``"layernorm"`` (centre, divide by ``sqrt(var + ε)``), ``"rmsnorm"`` (divide by
    ``sqrt(mean x² + ε)``) or ``"fixed"`` (no normalisation: ``γ ⊙ x + β`` with a scale of 1 —
    an ``nn.Identity`` norm slot, the residual multiplier).
    """

    kind: str
    weight: Float[Tensor, " d_model"]
    bias: Float[Tensor, " d_model"] | None
    eps: float

    def linear(
        self, z: Float[Tensor, "... d_model"], scale: Float[Tensor, "... 1"] | None
    ) -> Float[Tensor, "... d_model"]:
        """``g(z) = γ ⊙ (z − mean z) / s`` (RMSNorm: ``γ ⊙ z / s``): the norm as a linear map of one
        part ``z`` of its input, with the scale ``s`` of the *whole* input frozen
        (methods.md#notation). ``scale=None`` leaves out ``1/s``: the fixed linear part ``T`` of the
        norm.
        """
        centred = z - z.mean(-1, keepdim=True) if self.kind == "layernorm" else z
        out = self.weight * centred
        return out if scale is None else out / scale

    def apply(
        self, x: Float[Tensor, "... d_model"], scale: Float[Tensor, "... 1"]
    ) -> Float[Tensor, "... d_model"]:
        """``γ ⊙ (x − mean x) / s + β``: the norm's output, given the scale of ``x``."""
        out = self.linear(x, scale)
        return out + self.bias if self.bias is not None else out

    def to(self, device: torch.device) -> NormSpec:
        """The same norm with its tensors on ``device``."""
        bias = self.bias.to(device) if self.bias is not None else None
        return NormSpec(self.kind, self.weight.to(device), bias, self.eps)

    def scale_of(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... 1"]:
        """The scale the norm computes from its input (``hook_scale``, ε included)."""
        if self.kind == "fixed":
            return torch.ones_like(x[..., :1])
        centred = x - x.mean(-1, keepdim=True) if self.kind == "layernorm" else x
        # vector_norm is a fast reduction on the CPU (torch.var and pow().mean() are ~15x slower)
        variance = torch.linalg.vector_norm(centred, dim=-1, keepdim=True).square() / x.shape[-1]
        return (variance + self.eps).sqrt()


class Stage(str, Enum):
    """What a map decomposes; the registry (``tl_normmix.maps.scopes``) names them for users."""

    WEIGHTS = "weights"  # α, head mean (not a decomposition)
    WEIGHTS_RES = "weights_res"  # 0.5·ᾱ + 0.5·I
    ATTN = "attn"  # Σ_h α f: the pure attention output
    ATTN_RES = "attn_res"  # + the residual (after the attention output's own chain)
    ATTN_RES_LN = "attn_res_ln"  # + the norm(s) that read it: the feed-forward input
    FF = "ff"  # the feed-forward output, split by integrated gradients
    FF_RES = "ff_res"  # + the second residual (after the FF output's own chain)
    OUT = "out"  # the block output (after the norms over it, if any)
    GLOBENC = "globenc"  # post-LN: ATTN_RES_LN through LN2's frozen map, FF left out (§4)
    ALTI = "alti"  # the attention sublayer's resultant (ATTN_RES and the norms reading it), L1 (§4)


@dataclass(frozen=True)
class BlockLayout:
    """Where a block's linear maps sit (see the module docstring). Names are norm names of the
    block (``ln1``, ``ln1_post``, ...) or ``MULTIPLIER``."""

    parallel: bool = False
    attn_in: tuple[str, ...] = ()
    attn_out: tuple[str, ...] = ()
    mid: tuple[str, ...] = ()
    mlp_in: tuple[str, ...] = ()
    mlp_out: tuple[str, ...] = ()
    post: tuple[str, ...] = ()
    has_mlp: bool = True

    @property
    def name(self) -> str:
        """A short description for reports and errors (``pre_ln``, ``post_ln``, ...)."""
        norms = [n for n in (*self.attn_out, *self.mlp_out) if n != MULTIPLIER]
        if not [n for n in self.norms if n != MULTIPLIER]:
            base = "unnormalised"
        elif self.parallel:
            base = "parallel" if self.mlp_in != self.attn_in else "parallel_shared_norm"
        elif self.post or self.mid:
            base = "post_ln"
        elif norms and self.attn_in:
            base = "sandwich"
        elif norms:
            base = "post_branch_norms"
        else:
            base = "pre_ln"
        if not self.has_mlp:
            base += "_attention_only"
        return base + ("_scaled" if MULTIPLIER in (*self.attn_out, *self.mlp_out) else "")

    @property
    def norms(self) -> tuple[str, ...]:
        """Every map of the block in execution order, each once (the multiplier included)."""
        chains = (self.attn_in, self.attn_out, self.mid, self.mlp_in, self.mlp_out, self.post)
        return tuple(dict.fromkeys(n for chain in chains for n in chain))

    @property
    def ff_input(self) -> tuple[str, ...]:
        """The norms between the residual add and the feed-forward input (sequential blocks)."""
        return (*self.mid, *self.mlp_in)

    def chains(self, stage: Stage) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(pre, post)``: the maps applied to the attention parts before the residual joins
        (``pre``) and to the sum after it (``post``), for the attention-block stages."""
        if stage is Stage.ATTN_RES:
            return self.attn_out, ()
        if stage is Stage.ATTN_RES_LN:
            return self.attn_out, self.ff_input
        if stage is Stage.GLOBENC:
            return self.attn_out, (*self.mid, *self.post)
        if stage is Stage.ALTI:
            return self.attn_out, self.mid
        raise ValueError(f"{stage} is not an attention-block stage")

    def unsupported(self, stage: Stage) -> str | None:
        """Why ``stage`` does not exist in this layout (None if it does)."""
        if stage is Stage.ATTN_RES_LN:
            if self.parallel:
                return (
                    "in parallel blocks no norm reads the sum of the attention output and the "
                    "residual (the feed-forward block reads a norm of the layer input)"
                )
            if not [n for n in self.ff_input if n != MULTIPLIER]:
                return "no norm reads the sum of the attention output and the residual here"
        if stage is Stage.GLOBENC and (self.parallel or not self.mid or not self.post):
            return (
                "GlobEnc is defined for post-LN blocks (a norm over attention + residual, then a "
                "norm over the feed-forward residual), whose second norm it applies without the "
                "feed-forward block"
            )
        if stage in (Stage.FF, Stage.FF_RES):
            if not self.has_mlp:
                return "the block has no feed-forward part"
            if self.parallel:
                return (
                    "in parallel blocks the feed-forward block reads a norm of the layer input, "
                    "not the attention output, so within the layer its whole output belongs to "
                    "the receiving token"
                )
        return None


@dataclass(frozen=True)
class MLPSpec:
    """``FF(u) = act(u W_in + b_in) W_out + b_out``, or gated: ``(act(u W_gate + b_gate) ⊙ (u W_in +
    b_in)) W_out + b_out``, with an element-wise ``act`` (the model's own, checked on the cache):
    the closed forms of methods.md#the-feed-forward-block apply.

    ``bias_after_gate`` marks TransformerLens 2.x's gated MLP, which adds ``b_in`` after the
    product: ``(act(u W_gate) ⊙ (u W_in) + b_in) W_out + b_out``.
    """

    act: Callable[[Tensor], Tensor]
    act_name: str
    W_in: Float[Tensor, "d_model d_mlp"]
    b_in: Float[Tensor, " d_mlp"]
    W_out: Float[Tensor, "d_mlp d_model"]
    b_out: Float[Tensor, " d_model"]
    W_gate: Float[Tensor, "d_model d_mlp"] | None = None
    b_gate: Float[Tensor, " d_mlp"] | None = None
    bias_after_gate: bool = False

    @property
    def gated(self) -> bool:
        return self.W_gate is not None

    def hidden(
        self,
        pre: Float[Tensor, "... d_mlp"],
        pre_linear: Float[Tensor, "... d_mlp"] | None = None,
    ) -> Float[Tensor, "... d_mlp"]:
        """The hidden activation from the pre-activation(s) (gated: ``pre`` is the gate branch)."""
        act = self.act(pre)
        if not self.gated:
            return act
        if pre_linear is None:
            raise ValueError("A gated MLP needs both the gate and the linear pre-activations.")
        out = act * pre_linear
        return out + self.b_in if self.bias_after_gate else out

    def forward(self, u: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The whole feed-forward block on its input ``u``."""
        if self.W_gate is None:
            return self.hidden(u @ self.W_in + self.b_in) @ self.W_out + self.b_out
        gate = u @ self.W_gate + (self.b_gate if self.b_gate is not None else 0.0)
        linear = u @ self.W_in + (0.0 if self.bias_after_gate else self.b_in)
        return self.hidden(gate, linear) @ self.W_out + self.b_out


@dataclass(frozen=True)
class Router:
    """How a mixture of experts chooses its experts from its input ``u`` (the feed-forward input):
    logits ``r = u W + b`` — the router reads ``u`` linearly —, choice scores ``s = r``
    (``score="logits"``: softmax-then-top-k and top-k-then-softmax rank the logits alike) or
    ``s = σ(r) + c`` (``"sigmoid"`` with a selection bias ``c``), and the ``top_k`` largest
    chosen, within the best ``top_groups`` of ``groups`` equal groups of experts (a group ranked
    by the sum of its two best scores)."""

    weight: Float[Tensor, "d_model expert"]
    bias: Float[Tensor, " expert"] | None
    top_k: int
    score: str = "logits"  # "logits" or "sigmoid"
    choice_bias: Float[Tensor, " expert"] | None = None
    groups: int = 1
    top_groups: int = 1

    @property
    def n_experts(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, u: Float[Tensor, "... d_model"]) -> Float[Tensor, "... expert"]:
        r = u @ self.weight
        return r + self.bias if self.bias is not None else r

    def scores(self, r: Float[Tensor, "... expert"]) -> Float[Tensor, "... expert"]:
        """The choice scores of logits ``r``."""
        s = torch.sigmoid(r) if self.score == "sigmoid" else r
        return s + self.choice_bias if self.choice_bias is not None else s

    def chosen(self, u: Float[Tensor, "... d_model"]) -> Tensor:
        """Which experts ``u`` goes to: ``[..., expert]`` booleans, ``top_k`` of them."""
        return self.chosen_by(self.logits(u))

    def chosen_by(self, r: Float[Tensor, "... expert"]) -> Tensor:
        """Which experts logits ``r`` choose: ``[..., expert]`` booleans, ``top_k`` of them."""
        s = self.scores(r)
        if self.groups > 1:
            grouped = s.unflatten(-1, (self.groups, -1))
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            best = group_scores.topk(self.top_groups, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(-1, best, True)
            s = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(-2)
        index = s.topk(self.top_k, dim=-1).indices
        return torch.zeros_like(s, dtype=torch.bool).scatter(-1, index, True)

    def gap_gradient(
        self, u: Float[Tensor, "n d_model"], a: Tensor, b: Tensor
    ) -> Float[Tensor, "n d_model"]:
        """``∇_u (s_a − s_b)`` at ``u``: how the choice between experts ``a`` and ``b`` moves."""
        w_a, w_b = self.weight[:, a].T, self.weight[:, b].T  # [n, d]
        if self.score != "sigmoid":
            return w_a - w_b
        r = self.logits(u)
        slope_a = torch.sigmoid(r.gather(-1, a[:, None])) * (
            1 - torch.sigmoid(r.gather(-1, a[:, None]))
        )
        slope_b = torch.sigmoid(r.gather(-1, b[:, None])) * (
            1 - torch.sigmoid(r.gather(-1, b[:, None]))
        )
        return slope_a * w_a - slope_b * w_b

    def to(self, device: torch.device | torch.dtype) -> Router:
        """The same router with its tensors on ``device`` (or in a dtype)."""

        def move(t: Tensor | None) -> Tensor | None:
            return t.to(device) if t is not None else None

        return Router(
            self.weight.to(device),
            move(self.bias),
            self.top_k,
            self.score,
            move(self.choice_bias),
            self.groups,
            self.top_groups,
        )


@dataclass(frozen=True)
class FFModule:
    """Any feed-forward block given as a callable on ``[..., d_model]`` (mixture of experts, an
    activation without a per-unit form): split by integrated gradients with forward-mode
    derivatives (``decompose.generic_ff``). ``forward_ad`` returns a context in which the callable
    supports ``torch.func.jvp`` (e.g. a loop over experts instead of a grouped GEMM kernel);
    ``router``: where the block is a mixture of experts whose choice the router makes linearly
    from its input, the path is split where the choice changes (``decompose.router_path``)."""

    forward: Callable[[Tensor], Tensor]
    description: str
    width: int  # hidden units a token passes through (for memory estimates)
    forward_ad: Callable[[], AbstractContextManager[object]] = nullcontext
    router: Router | None = None

    @property
    def gated(self) -> bool:
        return False


FeedForward = MLPSpec | FFModule


@dataclass(frozen=True)
class BlockSpec:
    """What the math needs to know about every block of a model."""

    layout: BlockLayout
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    mlp_kind: str | None  # "dense", "gated", "module" (generic) or None (attention only)


@dataclass
class LayerTensors:
    """One layer's cached tensors (float32) by *role*, its weights, norms and feed-forward block.

    Roles: ``pattern`` ``[batch, head, query, key]``; ``v`` ``[batch, pos, kv_head, d_head]``
    (``b_V`` included); ``attn_out`` the pure attention output; ``resid_pre`` / ``resid_post`` the
    block input / output; ``mlp_in`` / ``mlp_out`` the feed-forward input / pure output;
    ``mlp_pre`` (gated: the gate branch), ``mlp_pre_linear``, ``mlp_post``; ``{norm}.in``,
    ``{norm}.scale`` ``[batch, pos, 1]``, ``{norm}.out`` for each norm of the layout.
    """

    layer: int
    block: BlockSpec
    hooks: dict[str, Tensor]
    W_O: Float[Tensor, "head_index d_head d_model"]
    b_O: Float[Tensor, " d_model"]
    norms: dict[str, NormSpec] = field(default_factory=dict)
    mlp: FeedForward | None = None
    precision: torch.dtype = torch.float32  # the cache's dtype (the tensors here are float32)
    b_V: Float[Tensor, "kv_head d_head"] | None = None  # inside hook_v; None where unknown

    def __getitem__(self, role: str) -> Tensor:
        return self.hooks[role]

    def __contains__(self, role: object) -> bool:
        return role in self.hooks

    def __iter__(self) -> Iterator[str]:
        return iter(self.hooks)

    def get(self, role: str, default: Tensor | None = None) -> Tensor | None:
        return self.hooks.get(role, default)

    @property
    def layout(self) -> BlockLayout:
        return self.block.layout

    def scale(self, norm: str) -> Float[Tensor, "batch pos 1"]:
        return self.hooks[f"{norm}.scale"]

    @property
    def pattern(self) -> Tensor:
        return self.hooks["pattern"]

    @property
    def v(self) -> Tensor:
        """Value vectors expanded to query heads: ``[batch, pos, head, d_head]``
        (methods.md#notation)."""
        v = self.hooks["v"]
        groups = self.block.n_heads // v.shape[2]
        return v if groups == 1 else v.repeat_interleave(groups, dim=2)

    @property
    def value_bias(self) -> Tensor | None:
        """``b_V`` expanded to query heads: ``[head, d_head]`` (None where unknown)."""
        if self.b_V is None:
            return None
        groups = self.block.n_heads // self.b_V.shape[0]
        return self.b_V if groups == 1 else self.b_V.repeat_interleave(groups, dim=0)

    @property
    def batch(self) -> int:
        return next(iter(self.hooks.values())).shape[0]

    @property
    def pos(self) -> int:
        if "pattern" in self.hooks:
            return self.hooks["pattern"].shape[-1]
        return next(iter(self.hooks.values())).shape[1]

    @property
    def device(self) -> torch.device:
        return next(iter(self.hooks.values())).device


def zeros_if_none(t: Tensor | None, size: int, like: Tensor) -> Tensor:
    """Missing biases (``None`` on Llama-style models) are zero (methods.md#notation)."""
    if t is None:
        return torch.zeros(size, dtype=torch.float32, device=like.device)
    return t.detach().float()
