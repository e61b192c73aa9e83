"""The exact element-wise activation functions of the supported models, by TransformerLens name."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "NON_ELEMENTWISE", "activation"]


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # exact (erf): BERT, GPT-NeoX
    "gelu_new": _gelu_tanh,  # GPT-2
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,  # Gemma
    "relu": F.relu,
    "silu": F.silu,  # Llama
    "swish": F.silu,
}

#: TransformerLens activations that mix hidden units (softmax-based): no per-unit integral.
NON_ELEMENTWISE = frozenset({"solu", "solu_ln"})


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation called ``name`` (TransformerLens ``cfg.act_fn``), or a clear error."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise NotImplementedError(
            f"Activation function {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}."
        ) from None
