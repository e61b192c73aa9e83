"""The attention-block maps of one layer (METHODS.md §1–2), from the adapter's tensors.

Everything shared between maps is computed once per layer: the masked pattern, its head mean, the
source vectors ``f^h(x_j)`` (a chunk of sources at a time), the self and context parts, and one
chunked pass of quadratic forms for all norm-based maps (``residual.decompose``). Which maps are
computed is given as ``{name: Stage}``; the chains of norms each stage passes through come from
the block's layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from jaxtyping import Bool, Float
from torch import Tensor

from tl_normmix.decompose import alti, attention, residual
from tl_normmix.decompose.blocks import LayerTensors, Stage

__all__ = ["ATTENTION_STAGES", "LayerMaps", "layer_maps", "mask_padding", "norm_chain"]

#: The stages computed here; the others run through the feed-forward block (``whole_layer``).
ATTENTION_STAGES = frozenset(
    {
        Stage.WEIGHTS,
        Stage.WEIGHTS_RES,
        Stage.ATTN,
        Stage.ATTN_RES,
        Stage.ATTN_RES_LN,
        Stage.GLOBENC,
        Stage.ALTI,
    }
)


@dataclass
class LayerMaps:
    maps: dict[str, Float[Tensor, "batch query_pos key_pos"]]
    ratios: dict[str, Float[Tensor, "batch query_pos"]]
    pattern: Float[Tensor, "batch head_index query_pos key_pos"] | None  # masked
    value_norms: Float[Tensor, "batch head_index pos"] | None  # ‖f^h(x_j)‖, masked
    # Rebuilds ALTI's inputs (for the per-head routes, on demand) from the few O(N·d) tensors it
    # holds besides the pattern; None unless ALTI was requested.
    routes: Callable[[], alti.AltiInputs] | None = None


def layer_maps(
    t: LayerTensors,
    mask: Bool[Tensor, "batch pos"],
    stages: Mapping[str, Stage],
    value_norms: bool,
    alti_eps: float = 0.0,
    alti_fold_value_bias: bool = False,
) -> LayerMaps:
    """Layer maps and mixing ratios named by ``stages`` for one layer; padded cells are zero.
    ``alti_eps``: ALTI's distance offset (``alti.alti_map``); ``alti_fold_value_bias``: ``b_V``
    to no part (``alti.alti_inputs``)."""
    padded = not bool(mask.all())
    pattern = None
    if "pattern" in t:
        pattern = attention.masked_pattern(t.pattern, mask) if padded else t.pattern
    maps: dict[str, Tensor] = {}
    ratios: dict[str, Tensor] = {}
    weights = {n: s for n, s in stages.items() if s in (Stage.WEIGHTS, Stage.WEIGHTS_RES)}
    if weights:
        assert pattern is not None
        mean = attention.head_mean(pattern)
        others = _off_diagonal_sum(mean)
        for name, stage in weights.items():
            if stage is Stage.WEIGHTS:
                maps[name], ratios[name] = mean, others
            else:
                half = 0.5 * mean
                half.diagonal(dim1=-2, dim2=-1).add_(0.5)
                maps[name], ratios[name] = half, 0.5 * others
    norms = None
    rebuild = None
    for name in [n for n, s in stages.items() if s is Stage.ALTI]:
        assert pattern is not None
        rebuild = _alti_inputs(t, pattern, alti_fold_value_bias)
        maps[name], ratios[name] = alti.alti_map(rebuild(), mask, alti_eps)
    requests = {
        n: _request(t, s)
        for n, s in stages.items()
        if s in ATTENTION_STAGES and n not in weights and s is not Stage.ALTI
    }
    if requests:
        assert pattern is not None
        mixed = t["attn_out"] - t.b_O if "attn_out" in t else None
        result = residual.decompose(pattern, t.v, t.W_O, requests, mixed=mixed)
        for name, (layer_map, ratio) in result.maps.items():
            maps[name], ratios[name] = layer_map, ratio
        norms = result.value_norms
    elif value_norms:
        norms = attention.value_norms(t.v, t.W_O)
    if padded:  # every map here is a fresh tensor: mask in place
        mask_padding(maps, ratios, mask)
        if norms is not None:
            norms = norms * mask[:, None, :]
    return LayerMaps(maps=maps, ratios=ratios, pattern=pattern, value_norms=norms, routes=rebuild)


def _alti_inputs(
    t: LayerTensors, pattern: Tensor, fold_value_bias: bool
) -> Callable[[], alti.AltiInputs]:
    v, W_O, b_O, request = t.v, t.W_O, t.b_O, _request(t, Stage.ALTI)
    value_bias = t.value_bias if fold_value_bias else None
    if fold_value_bias and value_bias is None:
        raise ValueError(
            "alti_value_bias='bias' needs b_V, which this model does not expose (multi-head "
            "latent attention); use the default 'source'."
        )
    return lambda: alti.alti_inputs(pattern, v, W_O, b_O, request, value_bias)


def _off_diagonal_sum(weights: Tensor) -> Tensor:
    return weights.sum(-1) - weights.diagonal(dim1=-2, dim2=-1)


def _request(t: LayerTensors, stage: Stage) -> residual.Request:
    if stage is Stage.ATTN:
        return residual.Request()
    pre, post = t.layout.chains(stage)
    return residual.Request(t["resid_pre"], norm_chain(t, pre), norm_chain(t, post))


def norm_chain(t: LayerTensors, names: tuple[str, ...]) -> residual.NormChain:
    """The layer's maps ``names``, in order, with their cached scales."""
    return residual.NormChain([(t.norms[n], t.scale(n)) for n in names])


def mask_padding(maps: dict[str, Tensor], ratios: dict[str, Tensor], mask: Tensor) -> None:
    """Zero the padded cells of fresh maps and set padded tokens' ratios to NaN, in place."""
    if bool(mask.all()):
        return
    pair = mask[:, :, None] & mask[:, None, :]
    for layer_map in maps.values():
        layer_map.masked_fill_(~pair, 0.0)
    for ratio in ratios.values():
        ratio.masked_fill_(~mask, float("nan"))
