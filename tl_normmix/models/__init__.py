"""The model adapter: structure read from the model, a probe run, roles → hooks, self-checks,
and loading of models. The only part of tl_normmix that knows TransformerLens."""

from tl_normmix.models.adapter import ModelAdapter, ModelSpec, adapt
from tl_normmix.models.editing import on_hidden_states
from tl_normmix.models.errors import MissingHookError, UnsupportedModelError, VerificationError
from tl_normmix.models.loading import load_model

__all__ = [
    "MissingHookError",
    "ModelAdapter",
    "ModelSpec",
    "UnsupportedModelError",
    "VerificationError",
    "adapt",
    "load_model",
    "on_hidden_states",
]
