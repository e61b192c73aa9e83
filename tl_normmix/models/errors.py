"""The errors of the model adapter: what is not supported, what is missing, what does not add up."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["MissingHookError", "UnsupportedModelError", "VerificationError"]


class UnsupportedModelError(NotImplementedError):
    """The model, or a feature of one of its blocks, is not supported by tl_normmix."""


class MissingHookError(LookupError):
    """The cache lacks hooks a computation needs."""

    def __init__(self, missing: Sequence[str], message: str) -> None:
        super().__init__(message)
        self.missing = tuple(missing)


class VerificationError(ValueError):
    """An identity that makes the maps exact does not hold on the cache at hand
    (methods.md#residual-and-layer-norm): the maps would be wrong, so none are returned."""

    def __init__(self, message: str, *, layer: int, identity: str, error: float) -> None:
        super().__init__(message)
        self.layer = layer
        self.identity = identity
        self.error = error
