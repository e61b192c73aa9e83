"""Value zeroing (Mohebbi et al. 2023; methods.md#the-peers-methods), exact and without a forward
per source.

For layer ``l`` and source ``j``, zeroing ``v^h_j`` (``b_V`` included) in every head removes exactly
column ``j`` of the attention parts: the attention output at receiver ``i`` becomes
``A_i − Σ_h α^h_ij f^h(x_j)`` (under grouped-query attention the key-value head is zeroed, so every
query head reading it loses the term — the same sum over query heads). Nothing before the
attention changes, so instead of a forward per (layer, source) only the block's tail runs
(``decompose.block_tail``: norms with recomputed scales, the feed-forward block), for a chunk of
sources at once, and only on the receivers that attend to them (``i ≥ j`` in causal models); the
removal reaches the feed-forward block's first matmul as an affine form (``PairForm``), so that
matmul costs ``N²·H·d_ff`` instead of ``N²·d·d_ff``.
The score ``s_ij = 1 − cos(ŷ_i^{(j)}, y_i)`` compares with the clean block output; rows are
divided by their sum, the diagonal included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_normmix import memory
from tl_normmix.decompose import attention
from tl_normmix.decompose.block_tail import RemovalTail, block_output, parallel_branch
from tl_normmix.decompose.blocks import LayerTensors, NormSpec
from tl_normmix.decompose.whole_layer import hidden_width
from tl_normmix.maps import SCOPES, MixingMaps
from tl_normmix.maps.mask import resolve_mask
from tl_normmix.maps.method import check_roles
from tl_normmix.models.adapter import adapt
from tl_normmix.models.checks import verify_layer
from tl_normmix.models.editing import editor

__all__ = ["value_zeroing", "zeroing_scores"]


@torch.no_grad()
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
    layer_list = adapter.check_layers(layers)
    tokens = tokens if tokens.ndim == 2 else tokens[None]
    layout = adapter.layout
    if final_norm_last and layout.post:
        raise ValueError(
            f"final_norm_last: {adapter.spec.model_name} has {layout.name} blocks, whose output is "
            "already normalised (a model's ln_final there belongs to a task head); leave it False."
        )
    final = adapter.final_norm() if final_norm_last else None
    if final_norm_last and final is None:
        raise ValueError(
            f"{adapter.spec.model_name} has no final norm (ln_final) to compare after."
        )
    roles = SCOPES["layer_n"].roles(layout) | {"pattern", "v", "attn_out"}
    optional = frozenset(
        r for r in check_roles([SCOPES["layer_n"]], layout) - roles if adapter.has_role(r)
    )
    if not verify:
        optional = frozenset()
    names = set(adapter.hook_names(roles | optional, layer_list))
    ed = editor(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens.to(ed.device),
            names_filter=lambda name: name in names,
            **ed.mask_kwargs(attention_mask),
        )
    last = adapter.spec.n_layers - 1
    scores: Tensor | None = None
    ratios: Tensor | None = None
    mask: Tensor | None = None
    checked: dict[int, dict[str, float]] = {}
    bar = tqdm(layer_list, desc="value zeroing", unit="layer", disable=not progress)
    for index, layer in enumerate(bar):
        present = {r for r in optional if adapter.in_cache(cache, r, layer)}
        t = adapter.read(cache, layer, roles | present)
        if mask is None:
            mask = resolve_mask(adapter, attention_mask, tokens, t)
        if verify:
            checked[layer] = verify_layer(
                t,
                mask,
                through_ff=True,
                precision=t.precision,
                model_name=adapter.spec.model_name,
                causal=adapter.spec.causal,
            )
        s = zeroing_scores(
            t, attention.masked_pattern(t.pattern, mask), mask, final if layer == last else None
        )
        if scores is None:
            scores = s.new_empty(len(layer_list), *s.shape)
            ratios = s.new_empty(len(layer_list), *s.shape[:2])
        assert ratios is not None
        scores[index] = s
        ratios[index] = (1.0 - s.diagonal(dim1=-2, dim2=-1)).masked_fill(~mask, float("nan"))
    assert scores is not None and ratios is not None and mask is not None
    return MixingMaps(
        layers=tuple(layer_list),
        maps={"vz": scores},
        heads={},
        ratios={"vz": ratios},
        mask=mask,
        convention=adapter.spec.convention,
        model_name=adapter.spec.model_name,
        tokens=tokens,
        str_tokens=adapter.str_tokens(tokens),
        causal=adapter.spec.causal,
        verification=checked,
    )


def zeroing_scores(
    t: LayerTensors,
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    mask: Bool[Tensor, "batch pos"],
    final: NormSpec | None = None,
    *,
    fold: bool = True,
) -> Float[Tensor, "batch query_pos key_pos"]:
    """Row-normalised ``1 − cos(ŷ_i^{(j)}, y_i)`` for one layer (``pattern`` masked): the block's
    tail re-run on the attention output without column ``j``, a chunk of sources at a time.
    ``fold=False``: each edited attention output written out and run through the tail (the
    reference for ``block_tail.RemovalTail``'s folded pre-activations)."""
    resid, attn = t["resid_pre"], t["attn_out"]
    branch = parallel_branch(t, resid)
    clean = _output(t, resid, attn, branch, final)
    f = attention.source_vectors(t.v, t.W_O)  # [batch, key, head, d]
    reaches = f.ne(0).any(dim=-1)  # [batch, key, head]: a nonzero value vector
    tail = RemovalTail(t, resid, attn, f, branch, fold=fold)
    batch, n, d = resid.shape
    width = d * 4 + hidden_width(t.mlp)
    # chunks of sources of a few cache blocks measure fastest: the block tail runs a matmul
    # per norm and feed-forward branch on each (scripts/bench_methods.py)
    block = 4 * memory.CACHE_BLOCK_BYTES
    chunk = memory.rows_per_chunk(4 * batch * n * width, n, budget_bytes=block)
    out = resid.new_zeros(batch, n, n)
    reached = (pattern != 0).any(dim=1).any(dim=0)  # [query, key]: any head, any batch row
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = reached[:, start:stop].any(dim=1).nonzero()
        if rows.numel() == 0:
            continue
        low = int(rows[0])  # receivers before it are untouched (causal models: low = start)
        # α^h_ij of the chunk's sources j as [batch, source, query, head]
        weights = pattern[:, :, low:, start:stop].permute(0, 3, 2, 1).contiguous()
        edited = tail.outputs(weights, slice(low, None), slice(start, stop))
        if final is not None:
            edited = final.apply(edited, final.scale_of(edited))
        # float64 for 1 − cos of nearly parallel vectors; an untouched receiver (Δ_ij = 0: a
        # future key, a zero weight or value) keeps its clean output, so its score is exactly 0
        cos = torch.nn.functional.cosine_similarity(
            edited.double(), clean[:, None, low:].double(), dim=-1
        )
        untouched = ~((weights != 0) & reaches[:, start:stop, None, :]).any(dim=-1)
        score = (1.0 - cos).masked_fill(untouched, 0.0)
        out[:, low:, start:stop] = score.transpose(1, 2).to(out.dtype)
    out.masked_fill_(~(mask[:, :, None] & mask[:, None, :]), 0.0)
    return out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)


def _output(
    t: LayerTensors, resid: Tensor, attn: Tensor, branch: Tensor | None, final: NormSpec | None
) -> Tensor:
    y = block_output(t, resid, attn, branch)
    return y if final is None else final.apply(y, final.scale_of(y))
