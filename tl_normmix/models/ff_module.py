"""A feed-forward block without a closed form, as a callable the generic path can differentiate.

``module_ff`` wraps the model's own module (Hugging Face's on a TransformerLens 4.x bridge,
TransformerLens's on 2.x) as a function of ``[n, d_model]`` vectors, and gives the context in
which forward-mode derivatives work on it (mixture-of-experts modules switched to their eager
loop over experts).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import Tensor

from tl_normmix.decompose.blocks import FFModule
from tl_normmix.models.errors import UnsupportedModelError
from tl_normmix.models.structure import Structure

__all__ = ["module_ff"]


def module_ff(model: Any, structure: Structure, layer: int) -> FFModule:
    """A feed-forward block without a closed form, as a callable on ``[n, d_model]`` vectors:
    the Hugging Face module (TL 4.x) or TransformerLens's (2.x)."""
    mlp = model.blocks[layer].mlp
    module = getattr(mlp, "original_component", None) if structure.family == "bridge" else mlp
    if not callable(module):
        raise UnsupportedModelError(
            f"{structure.model_name}, layer {layer}: the feed-forward module "
            f"({type(mlp).__name__}) cannot be called on its own, so whole-layer scopes are "
            "not available; attention-block scopes still work."
        )
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32

    def forward(u: Tensor) -> Tensor:
        try:
            out = module(u.reshape(1, -1, u.shape[-1]).to(dtype))
        except Exception as err:
            raise UnsupportedModelError(
                f"{structure.model_name}, layer {layer}: the feed-forward module "
                f"({type(module).__name__}) cannot be called on its own ({type(err).__name__}: "
                f"{err}), so whole-layer scopes are not available; attention-block scopes still "
                "work."
            ) from err
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(u.shape).float()

    cfg = model.cfg
    width = int(cfg.d_mlp or 4 * cfg.d_model) * int(getattr(cfg, "experts_per_token", None) or 1)
    return FFModule(
        forward=forward,
        description=f"{type(module).__name__} (generic: quadrature of forward-mode derivatives)",
        width=2 * width,
        forward_ad=_forward_ad_context(model),
    )


def _forward_ad_context(model: Any) -> Callable[[], AbstractContextManager[object]]:
    """Hugging Face mixture-of-experts modules run a grouped GEMM kernel without forward-mode
    derivatives; the reference loop over experts (``experts_implementation="eager"``) computes
    the same function and supports them."""
    original = getattr(model, "original_model", None)
    if original is None or not hasattr(original, "set_experts_implementation"):
        return _nothing

    @contextmanager
    def eager() -> Any:
        before = original.get_experts_implementation()
        if all(v in (None, "eager") for v in before.values()):
            yield
            return
        original.set_experts_implementation("eager")
        try:
            yield
        finally:
            original.set_experts_implementation(before)

    return eager


@contextmanager
def _nothing() -> Any:
    yield
