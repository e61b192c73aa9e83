"""Attention weights, norms, + residual, + layer norm (Kobayashi et al. 2020, 2021).

Two kernels: ``weights`` (the head mean of the masked pattern) and ``norms`` — one chunked pass
of quadratic forms serves every norm-based scope of a layer (``decompose.residual.decompose``),
GlobEnc's included (``methods.peers``). Docs: methods, "Attention weights and norms" and
"Residual and layer norm".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tl_normmix.decompose import attention, residual
from tl_normmix.decompose.attention_block import mask_padding, request_for
from tl_normmix.decompose.blocks import Stage
from tl_normmix.maps.method import HeadFactors, KernelOutput, LayerInputs, Method

__all__ = ["METHODS", "norms_kernel", "weights_kernel"]


def weights_kernel(
    layer: LayerInputs, methods: Mapping[str, Method], options: Mapping[str, Any]
) -> KernelOutput:
    """``attn_w``: the head mean ``ᾱ``, ratio ``Σ_{j≠i} ᾱ_ij``; ``attnres_w``: ``0.5·ᾱ + 0.5·I``,
    half the ratio."""
    assert layer.pattern is not None
    mean = attention.head_mean(layer.pattern)
    others = mean.sum(-1) - mean.diagonal(dim1=-2, dim2=-1)
    out = KernelOutput()
    for name, method in methods.items():
        if method.stage is Stage.WEIGHTS:
            out.maps[name], out.ratios[name] = mean, others
        else:
            half = 0.5 * mean
            half.diagonal(dim1=-2, dim2=-1).add_(0.5)
            out.maps[name], out.ratios[name] = half, 0.5 * others
    mask_padding(out.maps, out.ratios, layer.mask)
    return out


def norms_kernel(
    layer: LayerInputs, methods: Mapping[str, Method], options: Mapping[str, Any]
) -> KernelOutput:
    """``‖F_i(x_j)‖`` and ``r_i`` of every norm-based scope in one pass (methods §1–2), and the
    value norms ``‖f^h(x_j)‖`` that come with it."""
    t, pattern = layer.tensors, layer.pattern
    assert pattern is not None and all(m.stage is not None for m in methods.values())
    requests = {name: request_for(t, m.stage) for name, m in methods.items() if m.stage}
    chains = len({r.chain_key for r in requests.values()})
    batch, heads, _, n = pattern.shape
    rows = layer.rows(4 * batch * n * heads * (1 + chains))
    mixed = t["attn_out"] - t.b_O if "attn_out" in t else None
    result = residual.decompose(pattern, t.v, t.W_O, requests, mixed=mixed, chunk_size=rows)
    out = KernelOutput(value_norms=result.value_norms)
    for name, (layer_map, ratio) in result.maps.items():
        out.maps[name], out.ratios[name] = layer_map, ratio
    mask_padding(out.maps, out.ratios, layer.mask)
    return out


def _pattern_heads(factors: HeadFactors, options: Any) -> Any:
    assert factors.pattern is not None
    return factors.pattern


def _norm_heads(factors: HeadFactors, options: Any) -> Any:
    assert factors.pattern is not None and factors.value_norms is not None
    return attention.per_head_norms(factors.pattern, factors.value_norms)


_SECTION = "methods.md#attention-weights-and-norms"
_RESIDUAL = "methods.md#residual-and-layer-norm"

METHODS = (
    Method(
        "attn_w",
        "attention weights α; layer map: the head mean",
        _SECTION,
        Stage.WEIGHTS,
        weights_kernel,
        check="none",
        heads=_pattern_heads,
    ),
    Method(
        "attn_n",
        "‖Σ_h α^h_ij f^h(x_j)‖: the norm of what each source writes through attention",
        _SECTION,
        Stage.ATTN,
        norms_kernel,
        check="none",
        heads=_norm_heads,
    ),
    Method(
        "attnres_w",
        "0.5·ᾱ + 0.5·I: the weights with the residual as a fixed half",
        _RESIDUAL,
        Stage.WEIGHTS_RES,
        weights_kernel,
        check="none",
    ),
    Method(
        "attnres_n",
        "‖Σ_h α f + δ_ij x_i‖: attention plus the residual",
        _RESIDUAL,
        Stage.ATTN_RES,
        norms_kernel,
    ),
    Method(
        "attnresln_n",
        "‖g_i(Σ_h α f + δ x)‖: through the norm(s) that read attention + residual (the FF input)",
        _RESIDUAL,
        Stage.ATTN_RES_LN,
        norms_kernel,
        alternative="Use 'attnres_n' here",
    ),
)
