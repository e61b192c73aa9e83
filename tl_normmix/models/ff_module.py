"""A feed-forward block without a closed form, as a callable the generic path can differentiate.

``module_ff`` wraps the model's own module (Hugging Face's on a TransformerLens 4.x bridge,
TransformerLens's on 2.x) as a function of ``[n, d_model]`` vectors, and gives the context in
which forward-mode derivatives work on it (mixture-of-experts modules switched to their eager
loop over experts).

A mixture of experts' router is read off the module as data — the submodule with an
``[expert, d_model]`` weight and a ``top_k`` (Hugging Face), or ``W_gate`` and
``experts_per_token`` (TransformerLens 2.x); its bias, a selection bias and expert groups where it
has them — and the rule it chooses by (top-k of the logits, or of sigmoid scores plus the
selection bias) is checked against the router's own choice on random inputs; a router that does
not pass is not used (the generic path then integrates across switches and reports the
residual).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import Tensor

from tl_normmix.decompose.blocks import FFModule, Router
from tl_normmix.models.errors import UnsupportedModelError
from tl_normmix.models.structure import Structure

__all__ = ["module_ff", "read_router"]

logger = logging.getLogger("tl_normmix")


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
    router = read_router(module, int(cfg.d_model))
    how = "quadrature of forward-mode derivatives" + (", cut at router switches" if router else "")
    return FFModule(
        forward=forward,
        description=f"{type(module).__name__} (generic: {how})",
        width=2 * width,
        forward_ad=_forward_ad_context(model),
        router=router,
    )


def read_router(module: Any, d_model: int) -> Router | None:
    """The router of a mixture-of-experts ``module``, checked against its own choice; None where
    there is none or it does not choose by a rule ``Router`` states."""
    found = _hf_router(module, d_model) or _tl_router(module, d_model)
    if found is None:
        return None
    candidates, choose = found
    probe = torch.randn(64, d_model, generator=torch.Generator().manual_seed(0))
    for router in candidates:
        param = router.weight
        x = probe.to(device=param.device, dtype=param.dtype)
        try:
            with torch.no_grad():
                agrees = bool((router.chosen(x) == choose(x)).all())
        except Exception as err:  # a module that cannot run alone: refused where it is called
            logger.info("%s: its router could not be checked (%s); not read", type(module), err)
            return None
        if agrees:
            return router
    logger.info("%s: its router's choice follows no known rule; switches not cut", type(module))
    return None


def _hf_router(module: Any, d_model: int) -> tuple[list[Router], Any] | None:
    """A Hugging Face router: a submodule with an ``[expert, d_model]`` weight and a ``top_k``
    whose forward returns ``(logits, weights, indices)``."""
    for child in module.children():
        router = getattr(child, "original_component", child)
        weight = getattr(router, "weight", None)
        top_k = getattr(router, "top_k", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not isinstance(top_k, int):
            continue
        if weight.shape[1] != d_model:
            continue
        experts = int(weight.shape[0])
        bias = getattr(router, "bias", None)
        bias = bias.detach() if isinstance(bias, torch.Tensor) else None
        correction = getattr(router, "e_score_correction_bias", None)
        groups = int(getattr(router, "num_group", 1) or 1)
        top_groups = int(getattr(router, "topk_group", 1) or 1)
        w = weight.detach().T
        candidates = [Router(w, bias, top_k, "logits", None, groups, top_groups)]
        if isinstance(correction, torch.Tensor):
            selection = correction.detach()
            candidates.append(Router(w, bias, top_k, "sigmoid", selection, groups, top_groups))

        def choose(x: torch.Tensor, router: Any = router, experts: int = experts) -> torch.Tensor:
            index = router(x)[2]
            return torch.zeros(x.shape[0], experts, dtype=torch.bool, device=x.device).scatter(
                -1, index.reshape(x.shape[0], -1), True
            )

        return candidates, choose
    return None


def _tl_router(module: Any, d_model: int) -> tuple[list[Router], Any] | None:
    """TransformerLens 2.x's ``MoE``: ``W_gate`` and ``experts_per_token``."""
    gate = getattr(module, "W_gate", None)
    k = getattr(module, "experts_per_token", None)
    hook = getattr(module, "hook_expert_indices", None)
    weight = getattr(gate, "weight", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(k, int) or hook is None:
        return None
    if weight.ndim != 2 or weight.shape[1] != d_model:
        return None
    experts = int(weight.shape[0])

    def choose(x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        handle = hook.register_forward_hook(lambda m, i, out: seen.append(out))
        try:
            module(x[None])
        finally:
            handle.remove()
        index = seen[0].reshape(x.shape[0], -1)
        return torch.zeros(x.shape[0], experts, dtype=torch.bool, device=x.device).scatter(
            -1, index, True
        )

    bias = getattr(gate, "bias", None)
    bias = bias.detach() if isinstance(bias, torch.Tensor) else None
    return [Router(weight.detach().T, bias, k)], choose


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
