"""Whole-layer maps through the feed-forward block (Kobayashi et al. 2024): one kernel, one pass
of chunked pair vectors per layer serves every whole-layer scope (``decompose.whole_layer``).
Docs: methods, "The feed-forward block".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tl_normmix import memory
from tl_normmix.decompose import whole_layer
from tl_normmix.decompose.attention_block import mask_padding
from tl_normmix.decompose.blocks import BlockLayout, Stage
from tl_normmix.maps.method import KernelOutput, LayerInputs, Method

__all__ = ["METHODS", "WHOLE_LAYER_SCOPES", "FFOptions", "pass_bytes", "whole_layer_kernel"]


@dataclass(frozen=True)
class FFOptions:
    """How the feed-forward block is split and chunked (every whole-layer scope).

    Attributes:
        quadrature_points: None — the exact closed form for element-wise activations, 32
            Gauss–Legendre points for gated blocks and the generic path; an integer —
            quadrature with that many points for every block.
        chunk_size: receivers per chunk of the pair loop (None: as many as fill the memory
            budget, ``tl_normmix.memory``); a chunk that cannot fit in free memory is refused
            with one that would.
    """

    quadrature_points: int | None = None
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.quadrature_points is not None and self.quadrature_points < 1:
            raise ValueError(f"quadrature_points must be ≥ 1, got {self.quadrature_points}.")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {self.chunk_size}.")


def pass_bytes(
    batch: int, pos: int, heads: int, d_model: int, hidden: int, chunk_size: int | None = None
) -> int:
    """What the whole-layer pass of one layer holds at its peak, in bytes (float32): the values
    mapped through the FF's first matrix for the whole pass and one chunk of receivers, as many
    as the kernel puts in a chunk when free memory does not cap it."""
    per_query = whole_layer.chunk_bytes(batch, pos, 1, d_model, hidden)
    chunk = chunk_size or memory.rows_per_chunk(per_query, pos, minimum=whole_layer.MIN_CHUNK)
    return whole_layer.fixed_bytes(batch, pos, heads, d_model, hidden) + min(chunk, pos) * per_query


def whole_layer_kernel(
    layer: LayerInputs, methods: Mapping[str, Method], options: Mapping[str, Any]
) -> KernelOutput:
    """Maps, ratios and completeness residuals of the whole-layer scopes of one layer."""
    t, pattern, mask = layer.tensors, layer.pattern, layer.mask
    assert pattern is not None
    chosen = {options[name] for name in methods}
    if len(chosen) > 1:
        raise ValueError(
            f"The whole-layer scopes {list(methods)} share one pass: give them the same "
            f"FFOptions, not {sorted(map(repr, chosen))}."
        )
    opts: FFOptions = chosen.pop()
    batch, pos, heads = t.v.shape[0], t.v.shape[1], t.v.shape[2]
    d, hidden = t.W_O.shape[-1], whole_layer.hidden_width(t.mlp)
    per_query = whole_layer.chunk_bytes(batch, pos, 1, d, hidden)
    fixed = whole_layer.fixed_bytes(batch, pos, heads, d, hidden)
    if opts.chunk_size is not None:
        what = (
            f"Layer {t.layer}, the feed-forward pass (batch {batch}, {pos} tokens, {hidden} "
            "hidden units)"
        )
        memory.check_fits(
            min(opts.chunk_size, pos), per_query, device=t.device, fixed_bytes=fixed, what=what
        )
        chunk = opts.chunk_size
    else:
        chunk = memory.rows_per_chunk(
            per_query,
            pos,
            device=t.device,
            minimum=whole_layer.MIN_CHUNK,
            fixed_bytes=fixed,
            what=f"layer {t.layer} whole-layer pairs",
        )
    stages = {name: m.stage for name, m in methods.items() if m.stage is not None}
    result = whole_layer.whole_layer_maps(
        t,
        pattern,
        mask,
        stages,
        chunk=chunk,
        block_rows=layer.rows(4 * batch * pos * heads * 2),
        quadrature_points=opts.quadrature_points,
    )
    mask_padding(result.maps, result.ratios, mask)  # idempotent where scopes share a tensor
    completeness = {
        name: residual.masked_fill(~mask, float("nan"))
        for name, residual in result.completeness.items()
    }
    return KernelOutput(maps=result.maps, ratios=result.ratios, completeness=completeness)


def _needs_post(layout: BlockLayout) -> str | None:
    if layout.post:
        return None
    return (
        f"no norm follows the second residual inside a {layout.name} block, whose output is "
        "'attnreslnffres_n' (also called 'layer_n')"
    )


_SECTION = "methods.md#the-feed-forward-block"

METHODS = (
    Method(
        "attnreslnff_n",
        "‖IG_ij‖: the feed-forward output split over the sources by integrated gradients",
        _SECTION,
        Stage.FF,
        whole_layer_kernel,
        check="through_ff",
        options=FFOptions,
    ),
    Method(
        "attnreslnffres_n",
        "‖IG_ij + the residual parts‖: after the second residual",
        _SECTION,
        Stage.FF_RES,
        whole_layer_kernel,
        check="through_ff",
        options=FFOptions,
    ),
    Method(
        "attnreslnffresln_n",
        "post-LN: ‖g_i(IG_ij + parts)‖, after the second norm",
        _SECTION,
        Stage.OUT,
        whole_layer_kernel,
        check="through_ff",
        options=FFOptions,
        refuse=_needs_post,
    ),
    Method(
        "layer_n",
        "the whole block output, split over the sources",
        _SECTION,
        Stage.OUT,
        whole_layer_kernel,
        check="through_ff",
        options=FFOptions,
    ),
)

#: The whole-layer scopes in execution order.
WHOLE_LAYER_SCOPES = tuple(m.name for m in METHODS)
