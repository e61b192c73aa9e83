"""The padding mask of a run, resolved once per entry point and checked against the cache.

Given, it must have the cache's shape; absent, it is derived from the tokens the way
TransformerLens builds it for a padded batch (its tokenizer's pad token and padding side), or all
ones — refused where the cached pattern shows padding the model masked.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool
from torch import Tensor

from tl_normmix.decompose.blocks import LayerTensors
from tl_normmix.models.adapter import ModelAdapter

__all__ = ["resolve_mask"]


def resolve_mask(
    adapter: ModelAdapter, attention_mask: Tensor | None, tokens: Tensor | None, t: LayerTensors
) -> Bool[Tensor, "batch pos"]:
    """The padding mask of a run ``[batch, pos]``: given, derived from ``tokens`` as
    TransformerLens does, or all ones (refused where the pattern shows masked padding)."""
    batch, pos, device = t.batch, t.pos, t.device
    if tokens is not None:
        rows = tokens if tokens.ndim == 2 else tokens[None]
        if tuple(rows.shape) != (batch, pos):
            raise ValueError(
                f"tokens has shape {tuple(rows.shape)} but the cache holds [batch={batch}, "
                f"pos={pos}]: pass the tokens of the run that made the cache."
            )
    if attention_mask is None:
        derived = adapter.padding_mask(tokens) if tokens is not None else None
        if derived is not None:
            return derived.to(device=device).bool()
        if "pattern" in t:
            _refuse_hidden_padding(t.pattern, adapter.spec.causal)
        return torch.ones(batch, pos, dtype=torch.bool, device=device)
    if tuple(attention_mask.shape) != (batch, pos):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the cache holds "
            f"[batch={batch}, pos={pos}]; pass the mask used for the run that made the cache."
        )
    return attention_mask.to(device=device).bool()


def _refuse_hidden_padding(pattern: Tensor, causal: bool) -> None:
    """Padding the model masked, which the maps would count as tokens unless the mask is given:
    a key that no query attends to in any head (encoders, masked right padding), or — in a causal
    model — a first position that attends to later ones (left padding: fully masked rows)."""
    unseen = (pattern == 0).all(dim=1).all(dim=1).any(dim=-1)  # [batch]
    if causal and pattern.shape[-1] > 1:
        unseen |= (pattern[:, :, 0, 1:] != 0).any(dim=-1).any(dim=-1)
    if bool(unseen.any()):
        rows = [int(b) for b in unseen.nonzero()[:, 0]]
        raise ValueError(
            f"Batch row(s) {rows} of the cache look padded and masked (a key no query attends to, "
            "or a first position that attends to later ones). Pass the mask the run used, "
            "mixing_maps(..., attention_mask=mask), or the tokens (tokens=...) so tl_normmix can "
            "derive it as TransformerLens did."
        )
