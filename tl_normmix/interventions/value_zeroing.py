"""``nm.value_zeroing(model, tokens)``: the value-zeroing maps (Mohebbi et al. 2023;
methods.md#the-peers-methods) from tokens in one call — the model run once with the hooks the
``vz`` scope reads, then ``mixing_maps``. The math is ``decompose.value_zeroing``; the method is the
``vz`` entry of the registry, so ``mixing_maps(model, cache, ("vz", ...))`` computes it from any
cache of those hooks too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tl_normmix.maps import MixingMaps, hook_filter, mixing_maps
from tl_normmix.maps.mask import check_tokens
from tl_normmix.maps.methods.peers import ValueZeroingOptions
from tl_normmix.models.adapter import adapt
from tl_normmix.models.editing import editor

__all__ = ["value_zeroing"]


def value_zeroing(
    model: Any,
    tokens: Tensor,
    layers: int | Sequence[int] | None = None,
    attention_mask: Tensor | None = None,
    final_norm_last: bool = False,
    *,
    verify: bool = True,
    progress: bool = True,
) -> MixingMaps:
    """Value-zeroing maps ``vz`` ``[layer, batch, query, key]`` (rows sum to 1 over real tokens).

    Args:
        model: a TransformerLens model (any layout the adapter supports).
        tokens: ``[batch, pos]`` token ids.
        layers: a layer or layers (default: all).
        attention_mask: ``[batch, pos]`` padding mask (1 = token), passed to the model.
        final_norm_last: compare the last layer's outputs after the model's final norm, as
            inseq's implementation does (its other layers use the block outputs).
        verify: run the adapter's self-check on every layer used (``VerificationError``).
        progress: a progress bar over the layers.

    ``MixingMaps.mixing_ratio("vz")`` is ``1 − s_ii / Σ_j s_ij``: the share of the other tokens.
    """
    adapter = adapt(model)
    if final_norm_last and adapter.layout.post:
        raise ValueError(
            f"final_norm_last: {adapter.spec.model_name} has {adapter.layout.name} blocks, whose "
            "output is already normalised (a model's ln_final there belongs to a task head); "
            "leave it False."
        )
    if final_norm_last and adapter.final_norm() is None:
        raise ValueError(
            f"{adapter.spec.model_name} has no final norm (ln_final) to compare after."
        )
    tokens = check_tokens(tokens)
    ed = editor(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens.to(ed.device),
            names_filter=hook_filter(model, "vz", verify=verify),
            **ed.mask_kwargs(attention_mask),
        )
    return mixing_maps(
        model,
        cache,
        "vz",
        layers=layers,
        attention_mask=attention_mask,
        tokens=tokens,
        verify=verify,
        options=ValueZeroingOptions(final_norm_last=final_norm_last),
        progress=progress,
    )
