"""Element-wise activation functions: known candidates, and a test that a callable is one.

The model adapter takes each model's activation from its own MLP module and checks it on the cache
(``act(hook_pre) == hook_post``): TransformerLens's ``cfg.act_fn`` is wrong on some adapters (BLOOM,
Falcon, MPT and OpenAI-GPT say ``relu`` and compute GELU variants). The closed form of
methods.md#the-feed-forward-block needs an element-wise activation; ``is_elementwise`` tests that
property numerically.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "activation", "is_elementwise"]


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _relu_squared(x: Tensor) -> Tensor:
    return F.relu(x).square()


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # exact (erf): BERT, GPT-NeoX
    "gelu_new": _gelu_tanh,  # GPT-2
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,  # Gemma
    "relu": F.relu,
    "silu": F.silu,  # Llama
    "swish": F.silu,
    "relu2": _relu_squared,  # Nemotron
    "quick_gelu": _quick_gelu,
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation called ``name`` (TransformerLens ``cfg.act_fn``), or a clear error."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise NotImplementedError(
            f"Activation function {name!r} is not known; known: {', '.join(ACTIVATIONS)}."
        ) from None


def is_elementwise(act: Callable[[Tensor], Tensor], width: int = 16) -> bool:
    """Whether ``act`` acts on each unit alone: changing one input leaves the other outputs
    unchanged, and permuting the inputs permutes the outputs (SoLU's softmax fails both)."""
    gen = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(4, width, generator=gen)
    try:
        with torch.no_grad():
            y = act(x)
            bumped = x.clone()
            bumped[:, 0] += 1.0
            y_bumped = act(bumped)
            perm = torch.randperm(width, generator=gen)
            y_perm = act(x[:, perm])
    except Exception:  # an activation that cannot run on a plain tensor is not usable here
        return False
    if not isinstance(y, Tensor) or y.shape != x.shape:
        return False
    return bool(torch.allclose(y_bumped[:, 1:], y[:, 1:]) and torch.allclose(y_perm, y[:, perm]))
