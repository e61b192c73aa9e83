"""Whether a layer's parts add up to what the model computed (methods.md#the-feed-forward-block,
completeness): every decomposition sums, with its bias terms, to the cached output of its scope; a
relative residual above the tolerance of the cache's precision is warned about, naming the layer,
the scope, the worst receiver and the residual — never returned without a word."""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["CompletenessWarning", "tolerance", "warn_if_incomplete", "warn_if_residual"]

#: Relative residuals a cache of each precision reaches on an exact decomposition (float32 and
#: wider: quadrature and summation order; half precision: the cache's own rounding).
TOLERANCE: dict[torch.dtype, float] = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
DEFAULT_TOLERANCE = 1e-4


class CompletenessWarning(UserWarning):
    """A map whose parts do not add up to the block's output within the cache's precision."""


def tolerance(precision: torch.dtype) -> float:
    """The largest relative completeness residual accepted for a cache in ``precision``."""
    return TOLERANCE.get(precision, DEFAULT_TOLERANCE)


def warn_if_incomplete(
    residuals: dict[str, Float[Tensor, "batch pos"]],
    layer: int,
    precision: torch.dtype,
) -> None:
    """Warn once per scope of ``layer`` whose worst relative residual (NaN at padding) exceeds
    the tolerance of ``precision``."""
    limit = tolerance(precision)
    for scope, residual in residuals.items():
        filled = residual.detach().float().nan_to_num(0.0)
        worst = float(filled.max()) if filled.numel() else 0.0
        if worst <= limit:
            continue
        row, pos = divmod(int(filled.argmax()), filled.shape[-1])
        warnings.warn(
            f"layer {layer}, scope {scope!r}: the parts add up to the block output only to a "
            f"relative residual of {worst:.2e} at batch row {row}, receiving position {pos} "
            f"(tolerance {limit:.0e} for a {str(precision).removeprefix('torch.')} cache). The "
            "feed-forward module is split by integrated gradients and is not smooth along the "
            "path there (e.g. a router that does not read its input linearly); the per-receiver "
            "residuals are in maps.completeness.",
            CompletenessWarning,
            stacklevel=3,
        )


def warn_if_residual(
    residual: Tensor, precision: torch.dtype, what: str, where: str, *, stacklevel: int = 3
) -> None:
    """Warn once if the worst relative residual of ``what`` (NaN at padding ignored) exceeds
    the tolerance of ``precision``; ``where`` names the attribute holding it per row."""
    limit = tolerance(precision)
    filled = residual.detach().float().nan_to_num(0.0)
    worst = float(filled.max()) if filled.numel() else 0.0
    if worst > limit:
        warnings.warn(
            f"{what}: the parts add up to the model's value only to a relative residual of "
            f"{worst:.2e} (tolerance {limit:.0e} for a {str(precision).removeprefix('torch.')} "
            f"cache); {where} has it per row.",
            CompletenessWarning,
            stacklevel=stacklevel,
        )
