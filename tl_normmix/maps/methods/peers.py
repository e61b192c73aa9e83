"""The peers' per-layer maps: GlobEnc (Modarressi et al. 2022), ALTI (Ferrando et al. 2022) and
its per-head form, the information-flow routes, and value zeroing (Mohebbi et al. 2023). Docs:
methods, "The peers' methods".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from tl_normmix import memory
from tl_normmix.decompose import alti, value_zeroing
from tl_normmix.decompose.attention_block import alti_inputs_for
from tl_normmix.decompose.blocks import Stage
from tl_normmix.maps.method import HeadFactors, KernelOutput, LayerInputs, Method
from tl_normmix.maps.methods.attention import norms_kernel

__all__ = ["METHODS", "AltiOptions", "ValueZeroingOptions", "alti_kernel", "value_zeroing_kernel"]


@dataclass(frozen=True)
class AltiOptions:
    """ALTI's conventions (map and per-head routes).

    Attributes:
        floor: routes only — the least contribution of a part before the parts of a row are
            normalised (llm-transparency-tool uses 1e-5, which gives exact zeros such as future
            tokens a small share); 0 keeps them zero.
        eps: the L1 distance is ``‖T − y + eps‖₁``; the reference implementations use
            ``torch.nn.functional.pairwise_distance``, whose default adds ``1e-6`` to every
            component — 1e-6 reproduces them number for number; 0 is the exact ``‖y − T‖₁``.
        value_bias: ``"source"`` — ``b_V W_O`` inside each source's ``f`` (logit-explanations);
            ``"bias"`` — attributed to no part, as llm-transparency-tool does (it folds value
            biases into ``b_O``).
    """

    floor: float = 0.0
    eps: float = 0.0
    value_bias: Literal["source", "bias"] = "source"

    def __post_init__(self) -> None:
        if self.value_bias not in ("source", "bias"):
            raise ValueError(
                f"AltiOptions.value_bias must be 'source' or 'bias', got {self.value_bias!r}."
            )
        if self.floor < 0 or self.eps < 0:
            raise ValueError("AltiOptions.floor and eps must be ≥ 0.")


class _Routes:
    """One layer's routes, built on demand (``N²·H·d`` work); the residual share (``O(N)``) is
    kept once built, the per-head parts are handed over, not held."""

    def __init__(self, inputs: Any, mask: Tensor) -> None:
        self._inputs, self._mask = inputs, mask
        self._share: Tensor | None = None

    def parts(self, options: AltiOptions) -> tuple[Tensor, Tensor]:
        block = memory.CACHE_BLOCK_BYTES // 4
        heads, share = alti.alti_routes(
            self._inputs(), self._mask, options.floor, options.eps, block_floats=block
        )
        self._share = share
        return heads, share

    def share(self, options: AltiOptions) -> Tensor:
        return self._share if self._share is not None else self.parts(options)[1]


def alti_kernel(
    layer: LayerInputs, methods: Mapping[str, Method], options: Mapping[str, Any]
) -> KernelOutput:
    """ALTI's map and ratio ``1 − c_ii`` (methods §4); the routes' inputs for per-head maps."""
    assert layer.pattern is not None
    out = KernelOutput()
    for name in methods:
        opts: AltiOptions = options[name]
        inputs = alti_inputs_for(layer.tensors, layer.pattern, opts.value_bias == "bias")
        block = memory.CACHE_BLOCK_BYTES // 4
        out.maps[name], out.ratios[name] = alti.alti_map(
            inputs(), layer.mask, opts.eps, block_floats=block
        )
        out.state[name] = _Routes(inputs, layer.mask)
    return out


@dataclass(frozen=True)
class ValueZeroingOptions:
    """Value zeroing's convention.

    Attributes:
        final_norm_last: compare the last layer's outputs after the model's final norm, as
            inseq's implementation does (its other layers use the block outputs); refused on
            post-LN blocks, whose output is normalised already.
    """

    final_norm_last: bool = False


def value_zeroing_kernel(
    layer: LayerInputs, methods: Mapping[str, Method], options: Mapping[str, Any]
) -> KernelOutput:
    """``1 − cos`` of the block output with each source's values zeroed, rows normalised
    (methods §4), and the share of the other tokens ``1 − s_ii``."""
    t, pattern, mask = layer.tensors, layer.pattern, layer.mask
    assert pattern is not None
    out = KernelOutput()
    for name in methods:
        opts: ValueZeroingOptions = options[name]
        final = None
        if opts.final_norm_last and layer.last:
            if t.layout.post or layer.final_norm is None:
                raise ValueError(
                    f"final_norm_last: {t.layout.name} blocks' output is already normalised (the "
                    "model's ln_final belongs to a task head there); leave it False."
                    if t.layout.post
                    else "final_norm_last: the model has no final norm (ln_final) to compare after."
                )
            final = layer.final_norm
        # chunks of sources of a few cache blocks measure fastest: the block tail runs a matmul
        # per norm and feed-forward branch on each
        per_source = value_zeroing.source_bytes(t)
        block = 4 * memory.CACHE_BLOCK_BYTES
        chunk = memory.rows_per_chunk(per_source, t.pos, budget_bytes=block)
        scores = value_zeroing.zeroing_scores(t, pattern, mask, final, chunk=chunk)
        ratio = 1.0 - scores.diagonal(dim1=-2, dim2=-1)
        out.maps[name], out.ratios[name] = scores, ratio.masked_fill(~mask, float("nan"))
    return out


def _route_heads(factors: HeadFactors, options: AltiOptions) -> Tensor:
    return factors.state.parts(options)[0]


def _residual_share(factors: HeadFactors, options: AltiOptions) -> Tensor:
    return factors.state.share(options)


_SECTION = "methods.md#the-peers-methods"

METHODS = (
    Method(
        "globenc_n",
        "GlobEnc (post-LN): ‖g2_i(g1_i(Σ_h α f + δ x))‖, the second norm without the FF",
        _SECTION,
        Stage.GLOBENC,
        norms_kernel,
        check="through_ff",
    ),
    Method(
        "alti",
        "ALTI: max(0, ‖y_i‖₁ − ‖y_i − T_i(x_j)‖₁), rows normalised; per head: the "
        "information-flow routes",
        _SECTION,
        Stage.ALTI,
        alti_kernel,
        options=AltiOptions,
        heads=_route_heads,
        extras={"residual_share": _residual_share},
    ),
    Method(
        "vz",
        "value zeroing: 1 − cos(block output with v_j zeroed, block output), rows normalised",
        _SECTION,
        None,
        value_zeroing_kernel,
        check="through_ff",
        options=ValueZeroingOptions,
        reads=Stage.OUT,
    ),
)
