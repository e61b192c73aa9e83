"""A mixture of experts' router logits split over the context tokens that caused them
(methods.md#signed-attribution-to-a-target, routers).

The router reads the feed-forward input ``u_i`` linearly, ``r_i = u_i W + b``; ``u_i`` is the
residual stream after the attention block through the norms before the feed-forward block, each
frozen at receiver ``i``'s real scale. Pulling each expert's column ``W[:, e]`` back through those
norms (``decompose.readout``) splits ``r_ie`` exactly into

    Σ_j Σ_h α^h_ij (v^h_j W_O^h)·ρ_ie  +  x_i·ρ'_ie  +  (b_O, the norms' β, b_e)

— the sources of the layer's attention, the block input at ``i`` (everything earlier layers
wrote there) and the biases. In parallel blocks the router reads a norm of the block input, so
the layer's attention has no part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_normmix.aggregate.decomposition import read_layer
from tl_normmix.decompose import attention, readout
from tl_normmix.decompose.attention_block import norm_chain
from tl_normmix.decompose.blocks import FFModule, LayerTensors
from tl_normmix.decompose.residual import through_bias
from tl_normmix.maps.completeness import warn_if_residual
from tl_normmix.maps.mask import resolve_mask
from tl_normmix.models.adapter import adapt
from tl_normmix.models.errors import UnsupportedModelError

__all__ = ["RouterAttribution", "router_attribution"]


@dataclass
class RouterAttribution:
    """One layer's router logits split over source tokens (docs: guides, logit attribution).

    Attributes:
        layer: the layer.
        sources: ``[batch, pos, expert, source]``: the part of receiver ``pos``'s router logit
            for ``expert`` that the layer's attention brought from ``source``; zero at padding.
        terms: ``residual`` ``[batch, pos, expert]`` (the block input at ``pos``, read through the
            same norms) and ``bias`` (``b_O``, the norms' ``β``, the router's bias).
        logits: ``[batch, pos, expert]``: the model's router logits, from its feed-forward input
            rebuilt from the cache (the block input, the attention output and the norms before
            the feed-forward block, each with its cached scale); ``total`` the sum of every part;
            ``residual`` their relative difference per receiver (NaN at padding).
        chosen: ``[batch, pos, expert]``: the experts each receiver went to (top-k).
        top_k, score: the router's choice rule (``"logits"`` or ``"sigmoid"`` scores).
        choice_bias: the selection bias added to the scores before top-k (None without one).
    """

    layer: int
    sources: Float[Tensor, "batch pos expert source"]
    terms: dict[str, Tensor]
    logits: Float[Tensor, "batch pos expert"]
    total: Float[Tensor, "batch pos expert"]
    residual: Float[Tensor, "batch pos"]
    chosen: Bool[Tensor, "batch pos expert"]
    top_k: int
    score: str
    choice_bias: Tensor | None
    mask: Bool[Tensor, "batch pos"]
    model_name: str

    def __repr__(self) -> str:
        batch, n, experts, _ = self.sources.shape
        worst = float(self.residual.nan_to_num(0.0).max())
        return (
            f"RouterAttribution({self.model_name}, layer {self.layer}, batch={batch}, pos={n}, "
            f"experts={experts}, top_k={self.top_k}, residual={worst:.1e})"
        )


@torch.no_grad()
def router_attribution(
    model: Any,
    cache: Any,
    layer: int,
    *,
    attention_mask: Tensor | None = None,
    tokens: Tensor | None = None,
) -> RouterAttribution:
    """Split the router logits of ``layer`` (a mixture of experts) over the source tokens of the
    layer's attention, the block input and the biases.

    Args:
        model: the TransformerLens model that made ``cache``.
        cache: from ``run_with_cache(tokens, names_filter=nm.hook_filter(model, "layer_n"))``.
        layer: the layer (negative from the end).
        attention_mask, tokens: the run's padding, as for ``mixing_maps``.
    """
    adapter = adapt(model)
    (layer,) = adapter.check_layers(layer)
    has_ff = adapter.structure.mlp_kind_of(layer) is not None
    ff = adapter.feed_forward(layer) if has_ff else None
    router = ff.router if isinstance(ff, FFModule) else None
    if router is None:
        raise UnsupportedModelError(
            f"{adapter.spec.model_name}, layer {layer}: no router this library can read (the "
            "feed-forward block is not a mixture of experts whose router reads its input "
            "linearly)."
        )
    layout = adapter.layout
    ff_input = layout.mlp_in if layout.parallel else layout.ff_input
    roles = {"pattern", "v", "attn_out", "resid_pre"}
    roles |= {f"{n}.scale" for n in (*layout.attn_out, *ff_input)}
    t = read_layer(adapter, cache, layer, roles, "router_attribution")
    mask = resolve_mask(adapter, attention_mask, tokens, t)
    router = router.to(t.device)
    parts = _split(t, router.weight, ff_input, mask)
    bias = parts["bias"] + (router.bias if router.bias is not None else 0.0)
    logits = router.logits(_router_input(t, ff_input))
    total = parts["sources"].sum(-1) + parts["residual"] + bias
    scale = logits.norm(dim=-1).clamp_min(torch.finfo(logits.dtype).tiny)
    residual = ((total - logits).norm(dim=-1) / scale).masked_fill(~mask, float("nan"))
    warn_if_residual(residual, t.precision, f"router_attribution, layer {layer}", "ra.residual")
    return RouterAttribution(
        layer=layer,
        sources=parts["sources"],
        terms={"residual": parts["residual"], "bias": bias},
        logits=logits,
        total=total,
        residual=residual,
        chosen=router.chosen_by(logits),
        top_k=router.top_k,
        score=router.score,
        choice_bias=router.choice_bias,
        mask=mask,
        model_name=adapter.spec.model_name,
    )


def _split(
    t: LayerTensors,
    weight: Float[Tensor, "d_model expert"],
    ff_input: tuple[str, ...],
    mask: Tensor,
) -> dict[str, Tensor]:
    """Every column of ``weight`` pulled back through the norms before the feed-forward block at
    each receiver; its reading of the attention sources, the block input and the biases."""
    batch, n = mask.shape
    rho = weight.T.expand(batch, n, *weight.T.shape)  # [batch, pos, expert, d]

    def chain(names: tuple[str, ...]) -> list[tuple[Any, Tensor]]:
        return [(t.norms[name], t.scale(name)[:, :, None, :]) for name in names]

    rho, bias = readout.pull_back_chain(chain(ff_input), rho)
    residual = torch.einsum("bid,bied->bie", t["resid_pre"], rho)
    sources = rho.new_zeros(batch, n, rho.shape[2], n)
    if not t.layout.parallel:
        rho, attn_bias = readout.pull_back_chain(chain(t.layout.attn_out), rho)
        bias = bias + attn_bias + rho @ t.b_O
        pattern = attention.masked_pattern(t.pattern, mask)
        v = t.v
        for head in range(t.block.n_heads):
            read = rho @ t.W_O[head].T  # [batch, pos, expert, d_head]
            values = torch.einsum("bjd,bied->biej", v[:, :, head], read)
            sources += pattern[:, head, :, None, :] * values
    pad = ~mask[:, :, None]
    return {
        "sources": sources.masked_fill(pad[..., None], 0.0),
        "residual": residual.masked_fill(pad, 0.0),
        "bias": bias.masked_fill(pad, 0.0),
    }


def _router_input(t: LayerTensors, ff_input: tuple[str, ...]) -> Float[Tensor, "batch pos d_model"]:
    """The feed-forward input of the block: the stream the router reads, through its norms."""
    stream = t["resid_pre"]
    if not t.layout.parallel:
        stream = stream + through_bias(norm_chain(t, t.layout.attn_out), t["attn_out"])
    return through_bias(norm_chain(t, ff_input), stream)
