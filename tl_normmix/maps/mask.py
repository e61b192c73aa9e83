"""The padding mask of a run, resolved once per entry point and checked against the cache; the
checks of tokens and masks every entry point shares.

Given, a mask must have the cache's shape, hold 0/1 (or booleans), keep a real token in every row
and agree with the run: a key it marks as padding must carry no attention weight from a real
query in the cached pattern (a mask that is not the run's would silently drop keys the run read).
Absent, it is derived from the tokens the way TransformerLens builds it for a padded batch (its
tokenizer's pad token and padding side), or all ones — refused where the cached pattern shows
padding the model masked.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tl_normmix.decompose.blocks import LayerTensors
from tl_normmix.models.adapter import ModelAdapter

__all__ = ["check_attention_mask", "check_tokens", "resolve_mask"]

#: Attention weight on a key the mask calls padding above which the mask is not the run's.
LEAK_TOLERANCE = 1e-6


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def check_tokens(tokens: Any, what: str = "tokens") -> Int[Tensor, "batch pos"]:
    """``tokens`` as ``[batch, pos]``, or ``TypeError`` naming what is expected."""
    if (
        not isinstance(tokens, Tensor)
        or tokens.is_floating_point()
        or tokens.is_complex()
        or tokens.dtype == torch.bool
        or tokens.ndim not in (1, 2)
    ):
        raise TypeError(
            f"{what} must be a [batch, pos] (or [pos]) integer tensor of token ids, e.g. "
            f"model.to_tokens(text); got {_describe(tokens)}."
        )
    return tokens if tokens.ndim == 2 else tokens[None]


def check_attention_mask(mask: Any, shape: tuple[int, ...] | None = None) -> Bool[Tensor, "b p"]:
    """``mask`` as booleans: a ``[batch, pos]`` tensor of 1 (token) and 0 (padding) with at least
    one token per row (of ``shape`` where given), or an error saying what is wrong."""
    if not isinstance(mask, Tensor) or mask.ndim != 2:
        raise TypeError(
            "attention_mask must be a [batch, pos] tensor of 1 (token) and 0 (padding); got "
            f"{_describe(mask)}."
        )
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)} but the run is [batch={shape[0]}, "
            f"pos={shape[1]}]; pass the mask of the run."
        )
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 1 (token) and 0 (padding).")
    mask = mask.bool()
    empty = (~mask.any(dim=-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"attention_mask marks every token of batch row(s) {empty} as padding: each row "
            "needs at least one real token."
        )
    return mask


def resolve_mask(
    adapter: ModelAdapter, attention_mask: Tensor | None, tokens: Tensor | None, t: LayerTensors
) -> Bool[Tensor, "batch pos"]:
    """The padding mask of a run ``[batch, pos]``: given, derived from ``tokens`` as
    TransformerLens does, or all ones (refused where the pattern shows masked padding)."""
    batch, pos, device = t.batch, t.pos, t.device
    if tokens is not None:
        rows = check_tokens(tokens)
        if tuple(rows.shape) != (batch, pos):
            raise ValueError(
                f"tokens has shape {tuple(rows.shape)} but the cache holds [batch={batch}, "
                f"pos={pos}]: pass the tokens of the run that made the cache."
            )
    if attention_mask is None:
        derived = adapter.padding_mask(tokens) if tokens is not None else None
        if derived is None:
            if "pattern" in t:
                _refuse_hidden_padding(t.pattern, adapter.spec.causal)
            return torch.ones(batch, pos, dtype=torch.bool, device=device)
        mask = check_attention_mask(derived.to(device=device))
    else:
        mask = check_attention_mask(attention_mask.to(device=device), (batch, pos))
    if "pattern" in t:
        _refuse_attended_padding(t.pattern, mask)
    return mask


def _refuse_attended_padding(pattern: Tensor, mask: Tensor) -> None:
    """A key the mask calls padding that a real query attended to: the mask is not the run's."""
    pair = mask[:, None, :, None] & ~mask[:, None, None, :]  # real query, padded key
    if not bool(pair.any()):
        return
    leaked = pattern.float().masked_fill(~pair, 0.0)
    worst = float(leaked.amax())
    if worst <= LEAK_TOLERANCE:
        return
    b, h, i, j = (int(x) for x in (leaked == worst).nonzero()[0])
    raise ValueError(
        f"attention_mask marks key {j} of batch row {b} as padding, but the run attended to it "
        f"(head {h}, query {i}: weight {worst:.3g}): the mask is not the one the run used. Pass "
        "the run's mask, or none for an unpadded run."
    )


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
