"""First-order estimate of every edge's effect: one forward and one backward
(methods.md#interventions-on-edges).

With ``g_i = ∂m/∂z_i`` (the metric's gradient at the per-head mixed values of receiver ``i``), the
linearised effect of editing edge ``(l, h, i, j)`` by ``Δz^h_i`` is ``⟨Δz^h_i, g^h_i⟩``:

* ``remove``: ``Δz^h_i = −α^h_ij v^h_j`` → ``−α^h_ij ⟨v^h_j, g^h_i⟩``, which equals
  TransformerLens's attention attribution ``pattern · ∂m/∂pattern`` cell by cell
  (``∂m/∂α^h_ij = ⟨v^h_j, g^h_i⟩``);
* ``patch``: ``Δz^h_i = α'^h_ij v'^h_j − α^h_ij v^h_j`` with the source run's terms.

The gradient is taken through a zero leaf added at each layer's ``hook_z``, so it does not need
the model's parameters to require gradients and does not cut the graph between layers. Cost:
``O(L·N²·H·d_head)`` after the backward. Per-head effects are summed over heads for the layer
map (the first-order effect of removing the edge in all heads at once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_normmix.interventions.run import Metric, capture, check_metric
from tl_normmix.maps import MixingMaps
from tl_normmix.maps.mask import check_attention_mask, check_tokens
from tl_normmix.models.editing import editor, reads_hidden

__all__ = ["EdgeAttribution", "edge_attribution"]


@dataclass
class EdgeAttribution:
    """``maps``: ``[layer, batch, query, key]`` (all heads of an edge together); ``heads``:
    ``[layer, batch, head, query, key]``; padded and (causal) future cells are 0."""

    maps: Float[Tensor, "layer batch query_pos key_pos"]
    heads: Float[Tensor, "layer batch head_index query_pos key_pos"]
    mode: Literal["remove", "patch"]
    convention: str
    mask: Bool[Tensor, "batch pos"]
    model_name: str
    causal: bool
    clean: Float[Tensor, " batch"]

    def as_maps(self, scope: str = "attribution") -> MixingMaps:
        """As ``MixingMaps`` with one scope (absolute values: a score to rank edges by)."""
        return MixingMaps(
            layers=tuple(range(self.maps.shape[0])),
            maps={scope: self.maps.abs()},
            heads={scope: self.heads.abs()},
            ratios={},
            mask=self.mask,
            convention=self.convention,
            model_name=self.model_name,
            causal=self.causal,
        )


def edge_attribution(
    model: Any,
    tokens: Tensor,
    metric: Metric,
    mode: Literal["remove", "patch"] = "remove",
    source_tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    progress: bool = True,
) -> EdgeAttribution:
    """The first-order effect of ``remove`` (or ``patch`` with ``source_tokens``) on every edge
    of every layer, head, receiver and source: one forward and one backward (``progress``: a
    bar over the backward pass and the layers' scores)."""
    if mode not in ("remove", "patch"):
        raise ValueError(f"mode={mode!r}: edge_attribution supports 'remove' and 'patch'.")
    ed = editor(model)
    spec = ed.adapter.spec
    tokens = check_tokens(tokens).to(ed.device)
    batch, pos = tokens.shape
    mask = (
        check_attention_mask(attention_mask, (batch, pos)).to(ed.device)
        if attention_mask is not None
        else torch.ones_like(tokens, dtype=torch.bool)
    )
    layers = range(spec.n_layers)
    source: dict[str, Tensor] = {}
    if mode == "patch":
        if source_tokens is None or tuple(source_tokens.shape[-1:]) != (pos,):
            raise ValueError("mode='patch' needs source_tokens of the same shape as tokens.")
        src = check_tokens(source_tokens, "source_tokens")
        if src.shape != tokens.shape:
            raise ValueError(
                f"source_tokens has shape {tuple(src.shape)} but tokens {tuple(tokens.shape)}."
            )
        names = [n for layer in layers for n in (ed.pattern(layer), ed.v(layer))]
        with torch.no_grad():
            ed.run(src.to(ed.device), [(n, capture(source, n)) for n in names])
    cache: dict[str, Tensor] = {}
    leaves: dict[int, Tensor] = {}

    def leaf(layer: int) -> Callable[[Tensor, Any], Tensor]:
        def add(z: Tensor, hook: Any) -> Tensor:
            zero = torch.zeros_like(z, requires_grad=True)
            leaves[layer] = zero
            return z + zero

        return add

    hooks: list[Any] = [
        (n, capture(cache, n)) for layer in layers for n in (ed.pattern(layer), ed.v(layer))
    ]
    hooks += [(ed.z(layer), leaf(layer)) for layer in layers]
    bar = tqdm(total=len(layers) + 1, desc="edge_attribution", unit="step", disable=not progress)
    with torch.enable_grad():
        out = ed.run(tokens, hooks, attention_mask=attention_mask, hidden=reads_hidden(metric))
        value = metric(out)
        check_metric(metric, out.detach(), batch)
        grads = torch.autograd.grad(value.sum(), [leaves[layer] for layer in layers])
    bar.update(1)
    heads = []
    for layer, grad in zip(layers, grads, strict=True):
        pattern = cache[ed.pattern(layer)].float()  # [b, h, q, k]
        v = ed.v_heads(cache[ed.v(layer)].float())  # [b, k, h, d]
        g = grad.float().reshape(*grad.shape[:2], *v.shape[2:])  # [b, q, h, d]
        # ⟨v^h_j, g^h_i⟩ for every pair: [b, h, q, k]
        dots = torch.einsum("bqhd,bkhd->bhqk", g, v)
        score = -pattern * dots
        if mode == "patch":
            src_pattern = source[ed.pattern(layer)].float()
            src_v = ed.v_heads(source[ed.v(layer)].float())
            score = score + src_pattern * torch.einsum("bqhd,bkhd->bhqk", g, src_v)
        pair = mask[:, None, :, None] & mask[:, None, None, :]
        if spec.causal:
            pair = pair & torch.ones(pos, pos, dtype=torch.bool, device=pair.device).tril()
        heads.append(score.masked_fill(~pair, 0.0))
        bar.update(1)
    bar.close()
    per_head = torch.stack(heads).detach().cpu()
    return EdgeAttribution(
        maps=per_head.sum(2),
        heads=per_head,
        mode=mode,
        convention=spec.convention,
        mask=mask.cpu(),
        model_name=spec.model_name,
        causal=spec.causal,
        clean=value.detach().float().cpu(),
    )
