"""Circuits kept alone: every edge outside a set ablated, and faithfulness curves
(methods.md#interventions-on-edges).

``keep_only`` rewrites every layer's ``z^h_i`` as the sum of the kept terms ``α^h_ij v^h_j`` of
*that* forward (its live pattern and values, so that edits in earlier layers are seen by later
ones) plus, for ablated edges, nothing (``remove``), the source run's terms (``patch``) or their
mean over a reference batch (``mean``). The kept set, the empty set (``ablated_all``) and the full
set (``clean``, which must equal the unedited run) are rows of one forward. Where a model fires
``hook_pattern`` only after ``hook_z`` (BERT, RoBERTa, GPT-Neo, GPT-J, OPT, ModernBERT), the live
pattern of layer ``l`` is read in a pass that edits only the layers before it: ``L + 1`` forwards.

``faithfulness_curve`` keeps, per batch row, the top fraction of edges by a score map (a scope's
map, an attribution) and reports the metric and the share of the clean−ablated gap recovered:
all fractions are rows of the same forward(s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_normmix.interventions.edges import EdgeSet
from tl_normmix.interventions.run import Metric, capture, prepare, resolve_rows
from tl_normmix.maps.mask import check_tokens
from tl_normmix.models.editing import Editor, editor, reads_hidden

__all__ = ["FaithfulnessCurve", "KeptCircuit", "faithfulness_curve", "keep_only"]

#: How the edges outside a circuit are ablated.
Ablation = Literal["remove", "patch", "mean"]
ABLATIONS: tuple[Ablation, ...] = get_args(Ablation)


@dataclass
class KeptCircuit:
    """``value``: the metric with only the kept edges; ``clean``: without any edit;
    ``ablated_all``: with every edge ablated; ``recovered = (value − ablated_all) /
    (clean − ablated_all)`` (NaN where clean equals ablated_all); all ``[batch]``."""

    value: Float[Tensor, " batch"]
    clean: Float[Tensor, " batch"]
    ablated_all: Float[Tensor, " batch"]
    recovered: Float[Tensor, " batch"]
    ablation: Ablation
    n_forwards: int
    clean_check: Float[Tensor, " batch"]  # the "keep everything" row: must equal clean


@dataclass
class FaithfulnessCurve:
    """Per fraction of kept edges (rows): the metric and the share of the gap recovered."""

    fractions: tuple[float, ...]
    value: Float[Tensor, "fraction batch"]
    clean: Float[Tensor, " batch"]
    ablated_all: Float[Tensor, " batch"]
    recovered: Float[Tensor, "fraction batch"]
    n_forwards: int


def keep_only(
    model: Any,
    tokens: Tensor,
    E: EdgeSet,
    metric: Metric,
    ablation: Ablation = "remove",
    source_tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    progress: bool = True,
) -> KeptCircuit:
    """The metric with every edge outside ``E`` ablated (``E``'s all-head edges keep every head
    of their ``(layer, i, j)``); see the module docstring."""
    ed = editor(model)
    spec = ed.adapter.spec
    inputs = prepare(ed, tokens, metric, [], attention_mask)
    batch, pos = inputs.tokens.shape
    kept = torch.zeros(spec.n_layers, batch, spec.block.n_heads, pos, pos, dtype=torch.bool)
    edges = E.resolve(spec.n_layers, spec.block.n_heads, pos)
    for edge, rows in zip(edges, resolve_rows(edges, inputs.mask, spec.causal), strict=True):
        for b, (i, j) in rows.items():
            heads = slice(None) if edge.head is None else edge.head
            kept[edge.layer, b, heads, i, j] = True
    masks = torch.cat([kept, torch.zeros_like(kept), torch.ones_like(kept)], dim=1)
    values, n_forwards = _run_kept(ed, inputs, masks, metric, ablation, source_tokens, 3, progress)
    value, ablated, full = values
    return KeptCircuit(
        value=value,
        clean=inputs.clean_metric.cpu(),
        ablated_all=ablated,
        recovered=_recovered(value, inputs.clean_metric.cpu(), ablated),
        ablation=ablation,
        n_forwards=n_forwards,
        clean_check=full,
    )


def faithfulness_curve(
    model: Any,
    tokens: Tensor,
    metric: Metric,
    scores: Tensor,
    fractions: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
    *,
    ablation: Ablation = "remove",
    source_tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
    progress: bool = True,
) -> FaithfulnessCurve:
    """For each fraction ``f``: keep the top ``f`` of each row's edges by ``scores`` —
    ``[layer, batch, query, key]`` (all heads of a cell together, e.g. ``maps["attn_n"]``) or
    ``[layer, batch, head, query, key]`` (e.g. ``attribution.heads``) — ablate the rest."""
    ed = editor(model)
    spec = ed.adapter.spec
    inputs = prepare(ed, tokens, metric, [], attention_mask)
    batch, pos = inputs.tokens.shape
    heads = spec.block.n_heads
    if scores.ndim == 4:
        per_head = False
        expected: tuple[int, ...] = (spec.n_layers, batch, pos, pos)
    else:
        per_head = True
        expected = (spec.n_layers, batch, heads, pos, pos)
    if tuple(scores.shape) != expected:
        raise ValueError(
            f"scores has shape {tuple(scores.shape)}; expected {expected} (every layer, batch "
            "row and cell of this run; per head optional)."
        )
    valid = inputs.mask[:, :, None].cpu() & inputs.mask[:, None, :].cpu()  # [batch, q, k]
    if spec.causal:
        valid = valid & torch.ones(pos, pos, dtype=torch.bool).tril()
    cells = scores.detach().float().cpu()
    if not per_head:
        cells = cells[:, :, None].expand(-1, -1, heads, -1, -1)[:, :, :1]
    valid_cells = valid[None, :, None].expand_as(cells)
    masks = []
    for fraction in fractions:
        keep = torch.zeros_like(valid_cells)
        for b in range(batch):
            row = cells[:, b].masked_fill(~valid_cells[:, b], float("-inf")).flatten()
            count = round(fraction * int(valid_cells[:, b].sum()))
            chosen = torch.zeros(row.numel(), dtype=torch.bool)
            if count:
                chosen[row.topk(count).indices] = True
            keep[:, b] = chosen.view(cells[:, b].shape)
        if not per_head:
            keep = keep.expand(-1, -1, heads, -1, -1)
        masks.append(keep)
    masks.append(torch.zeros(spec.n_layers, batch, heads, pos, pos, dtype=torch.bool))
    values, n_forwards = _run_kept(
        ed, inputs, torch.cat(masks, dim=1), metric, ablation, source_tokens, len(masks), progress
    )
    value = torch.stack(values[:-1])
    ablated = values[-1]
    clean = inputs.clean_metric.cpu()
    return FaithfulnessCurve(
        fractions=tuple(fractions),
        value=value,
        clean=clean,
        ablated_all=ablated,
        recovered=_recovered(value, clean, ablated),
        n_forwards=n_forwards,
    )


def _recovered(value: Tensor, clean: Tensor, ablated: Tensor) -> Tensor:
    gap = clean - ablated
    return (value - ablated) / gap.where(gap != 0, torch.tensor(float("nan")))


def _run_kept(
    ed: Editor,
    inputs: Any,
    masks: Bool[Tensor, "layer rows head query key"],
    metric: Metric,
    ablation: Ablation,
    source_tokens: Tensor | None,
    blocks: int,
    progress: bool,
) -> tuple[list[Tensor], int]:
    """Forward(s) of ``blocks`` copies of the batch, row block ``k`` keeping ``masks[:, k·B:]``;
    returns the metric per block and the number of forwards."""
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation={ablation!r}: use one of {', '.join(ABLATIONS)}.")
    spec = ed.adapter.spec
    batch = inputs.tokens.shape[0]
    device = ed.device
    masks = masks.to(device)
    background = _background(ed, ablation, source_tokens, inputs, blocks)
    tokens = inputs.tokens.repeat(blocks, 1)
    attention_mask = inputs.attention_mask
    attention_mask = attention_mask.repeat(blocks, 1) if attention_mask is not None else None
    hidden = reads_hidden(metric)
    n_layers = spec.n_layers
    live: dict[str, Tensor] = {}

    def rewrite(layer: int) -> Any:
        def hook(z: Tensor, hook: Any) -> Tensor:
            pattern = live[ed.pattern(layer)].float()  # this forward's [rows, h, q, k]
            v = ed.v_heads(live[ed.v(layer)].float())  # [rows, k, h, d]
            kept = pattern * masks[layer]
            new = torch.einsum("bhij,bjhd->bihd", kept, v)
            if background is not None:
                new = new + background(layer, masks[layer])
            # written into a copy of z seen as [rows, pos, head, d_head]: the hook's own view may
            # be another reshape of the flat per-head values (the MLA bridge's)
            out = z.clone()
            out.view(*z.shape[:2], *new.shape[2:]).copy_(new.to(z.dtype))
            return out

        return hook

    n_forwards = 0
    patterns: dict[str, Tensor] = {}

    def edited_below(layer: int) -> list[Any]:
        """Hooks rewriting layers ``< layer`` with the patterns read in their own passes."""
        hooks: list[Any] = [(ed.v(k), capture(live, ed.v(k))) for k in range(layer)]
        hooks += [(ed.z(k), _with_pattern(rewrite(k), live, ed, k, patterns)) for k in range(layer)]
        return hooks

    passes = 1 if ed.pattern_before_z else n_layers + 1
    bar = tqdm(total=passes, desc="kept edges", unit="forward", disable=not progress)
    if not ed.pattern_before_z:  # read each layer's live pattern in a pass editing only below it
        for layer in range(n_layers):
            hooks = [*edited_below(layer), (ed.pattern(layer), capture(patterns, str(layer)))]
            with torch.no_grad():
                ed.run(tokens, hooks, attention_mask=attention_mask, hidden=hidden)
            n_forwards += 1
            bar.update(1)
        hooks = edited_below(n_layers)
    else:
        hooks = [
            (name, capture(live, name))
            for k in range(n_layers)
            for name in (ed.pattern(k), ed.v(k))
        ]
        hooks += [(ed.z(k), rewrite(k)) for k in range(n_layers)]
    with torch.no_grad():
        out = ed.run(tokens, hooks, attention_mask=attention_mask, hidden=hidden)
    n_forwards += 1
    bar.update(1)
    bar.close()
    values = [
        metric(out[k * batch : (k + 1) * batch]).detach().float().cpu() for k in range(blocks)
    ]
    return values, n_forwards


def _with_pattern(
    rewrite: Any, live: dict[str, Tensor], ed: Editor, layer: int, patterns: dict[str, Tensor]
) -> Any:
    """The rewrite of ``layer`` with the pattern read in its own earlier pass."""

    def hook(z: Tensor, hook: Any) -> Tensor:
        live[ed.pattern(layer)] = patterns[str(layer)]
        return rewrite(z, hook)

    return hook


def _background(
    ed: Editor, ablation: Ablation, source_tokens: Tensor | None, inputs: Any, blocks: int
) -> Any:
    """What ablated edges contribute: nothing (``remove``), or the source run's terms (``patch``)
    or their mean over a reference batch (``mean``), as ``f(layer, keep mask) -> Δz``."""
    if ablation == "remove":
        return None
    if source_tokens is None:
        raise ValueError(f"ablation={ablation!r} needs source_tokens.")
    source = check_tokens(source_tokens, "source_tokens")
    if source.shape[-1] != inputs.tokens.shape[-1] or (
        ablation == "patch" and source.shape != inputs.tokens.shape
    ):
        raise ValueError(
            f"source_tokens has shape {tuple(source.shape)} but tokens "
            f"{tuple(inputs.tokens.shape)}."
        )
    spec = ed.adapter.spec
    cache: dict[str, Tensor] = {}
    names = [n for k in range(spec.n_layers) for n in (ed.pattern(k), ed.v(k))]
    with torch.no_grad():
        ed.run(source.to(ed.device), [(n, capture(cache, n)) for n in names])
    terms = {}
    for k in range(spec.n_layers):
        pattern = cache[ed.pattern(k)].float()  # [b', h, q, k]
        v = ed.v_heads(cache[ed.v(k)].float())  # [b', k, h, d]
        per_pair = pattern[..., None] * v.permute(0, 2, 1, 3)[:, :, None]  # [b', h, q, k, d]
        if ablation == "mean":
            per_pair = per_pair.mean(0, keepdim=True).expand(inputs.tokens.shape[0], -1, -1, -1, -1)
        terms[k] = per_pair.repeat(blocks, 1, 1, 1, 1)

    def contribution(layer: int, keep: Tensor) -> Tensor:
        dropped = terms[layer] * (~keep)[..., None]
        return dropped.sum(3).permute(0, 2, 1, 3)  # [rows, q, h, d]

    return contribution
