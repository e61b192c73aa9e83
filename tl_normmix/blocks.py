"""A small, TransformerLens-free description of a transformer block.

The model adapter fills these from a model; the math reads them. They say *what* a block computes
(METHODS.md §0 and §3): where its norms sit, what kind each norm is, and how its feed-forward
block is built. No hook names and no TransformerLens types appear here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
from jaxtyping import Float
from torch import Tensor

from tl_normmix.activations import ACTIVATIONS, activation

__all__ = ["BlockKind", "BlockSpec", "MLPSpec", "NormSpec"]


class BlockKind(str, Enum):
    """Where the norms and residual adds of a block sit (METHODS.md §3, whole-layer scopes)."""

    PRE_LN = "pre_ln"  # GPT-2, Llama: x + attn(LN1(x)); then + mlp(LN2(.))
    POST_LN = "post_ln"  # BERT: LN1(x + attn(x)); then LN2(. + mlp(.))
    PARALLEL = "parallel"  # GPT-NeoX, GPT-J: x + attn(LN1(x)) + mlp(LN2(x))
    SANDWICH = "sandwich"  # Gemma-2/3: x + LN1post(attn(LN1(x))); then + LN2post(mlp(LN2(.)))

    @property
    def norms(self) -> tuple[str, ...]:
        """The block's norms, in execution order, by their TransformerLens names."""
        if self is BlockKind.SANDWICH:
            return ("ln1", "ln1_post", "ln2", "ln2_post")
        return ("ln1", "ln2")


@dataclass(frozen=True)
class NormSpec:
    """A LayerNorm or RMSNorm with its effective weight ``γ`` (``1 + w`` already resolved)."""

    kind: str  # "layernorm" or "rmsnorm"
    weight: Float[Tensor, " d_model"]
    bias: Float[Tensor, " d_model"] | None
    eps: float

    def linear(
        self, z: Float[Tensor, "... d_model"], scale: Float[Tensor, "... 1"] | None
    ) -> Float[Tensor, "... d_model"]:
        """``g(z) = γ ⊙ (z − mean z) / s`` (RMSNorm: ``γ ⊙ z / s``): the norm as a linear map of
        one part ``z`` of its input, with the scale ``s`` of the *whole* input frozen (METHODS §0).
        ``scale=None`` leaves out ``1/s``: the fixed linear part ``T`` of the norm.
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


@dataclass(frozen=True)
class MLPSpec:
    """``FF(u) = act(u W_in + b_in) W_out + b_out``, or gated:
    ``(act(u W_gate + b_gate) ⊙ (u W_in + b_in)) W_out + b_out``.

    ``bias_after_gate`` marks TransformerLens 2.x's gated MLP, which adds ``b_in`` after the
    product: ``(act(u W_gate) ⊙ (u W_in) + b_in) W_out + b_out``.
    """

    act_fn: str
    W_in: Float[Tensor, "d_model d_mlp"]
    b_in: Float[Tensor, " d_mlp"]
    W_out: Float[Tensor, "d_mlp d_model"]
    b_out: Float[Tensor, " d_model"]
    W_gate: Float[Tensor, "d_model d_mlp"] | None = None
    b_gate: Float[Tensor, " d_mlp"] | None = None
    bias_after_gate: bool = False
    act: Callable[[Tensor], Tensor] | None = None  # the model's own activation module, if any

    @property
    def gated(self) -> bool:
        return self.W_gate is not None

    @property
    def activation(self) -> Callable[[Tensor], Tensor]:
        """The exact activation by name, else the model's own module (if it was found)."""
        if self.act_fn not in ACTIVATIONS and self.act is not None:
            return self.act
        return activation(self.act_fn)

    def hidden(
        self,
        pre: Float[Tensor, "... d_mlp"],
        pre_linear: Float[Tensor, "... d_mlp"] | None = None,
    ) -> Float[Tensor, "... d_mlp"]:
        """The hidden activation from the pre-activation(s) (gated: ``pre`` is the gate branch)."""
        act = self.activation(pre)
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
class BlockSpec:
    """What the math needs to know about every block of a model."""

    kind: BlockKind
    norm_kind: str  # "layernorm" or "rmsnorm"
    act_fn: str
    gated_mlp: bool
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int

    @property
    def norms(self) -> tuple[str, ...]:
        return self.kind.norms


def zeros_if_none(t: Tensor | None, size: int, like: Tensor) -> Tensor:
    """Missing biases (``None`` on Llama-style models) are zero (METHODS.md §0)."""
    if t is None:
        return torch.zeros(size, dtype=torch.float32, device=like.device)
    return t.detach().float()
