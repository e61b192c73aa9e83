"""Helpers every attention-block decomposition of one layer shares
(methods.md#attention-weights-and-norms): the norm chains of a stage, read from the block's layout
with the layer's cached scales; ALTI's inputs; and the padding of fresh maps.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxtyping import Bool, Float
from torch import Tensor

from tl_normmix.decompose import alti, residual
from tl_normmix.decompose.blocks import LayerTensors, Stage

__all__ = ["alti_inputs_for", "mask_padding", "norm_chain", "request_for"]


def request_for(t: LayerTensors, stage: Stage) -> residual.Request:
    """The residual and norm chains of an attention-block ``stage`` in ``t``'s layout."""
    if stage is Stage.ATTN:
        return residual.Request()
    pre, post = t.layout.chains(stage)
    return residual.Request(t["resid_pre"], norm_chain(t, pre), norm_chain(t, post))


def norm_chain(t: LayerTensors, names: tuple[str, ...]) -> residual.NormChain:
    """The layer's maps ``names``, in order, with their cached scales."""
    return residual.NormChain([(t.norms[n], t.scale(n)) for n in names])


def alti_inputs_for(
    t: LayerTensors,
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    fold_value_bias: bool,
) -> Callable[[], alti.AltiInputs]:
    """Builds ALTI's inputs of the layer (``pattern`` masked) on each call: the few ``O(N·d)``
    tensors they rest on are held, the ``O(N·H·d)`` ones rebuilt. ``fold_value_bias``: ``b_V W_O``
    to no part (``alti.alti_inputs``)."""
    v, W_O, b_O, request = t.v, t.W_O, t.b_O, request_for(t, Stage.ALTI)
    value_bias = t.value_bias if fold_value_bias else None
    if fold_value_bias and value_bias is None:
        raise ValueError(
            "AltiOptions(value_bias='bias') needs b_V, which this model does not expose "
            "(multi-head latent attention); use the default 'source'."
        )
    return lambda: alti.alti_inputs(pattern, v, W_O, b_O, request, value_bias)


def mask_padding(
    maps: dict[str, Tensor], ratios: dict[str, Tensor], mask: Bool[Tensor, "batch pos"]
) -> None:
    """Zero the padded cells of fresh maps and set padded tokens' ratios to NaN, in place."""
    if bool(mask.all()):
        return
    pair = mask[:, :, None] & mask[:, None, :]
    for layer_map in maps.values():
        layer_map.masked_fill_(~pair, 0.0)
    for ratio in ratios.values():
        ratio.masked_fill_(~mask, float("nan"))
