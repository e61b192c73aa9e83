"""Exact, batched interventions on token edges (methods.md#interventions-on-edges): ``knock_out``.

For an edge ``e = (l, h or all heads, i, j)`` with term ``p_e = α^h_ij f^h(x_j)`` the modes edit
the pure attention output at receiver ``i`` of layer ``l`` — through ``z^h_i`` (``models.editing``),
so the edit of the output is exactly:

=========== ========================================== ==========================================
mode        edit                                       equals
=========== ========================================== ==========================================
remove      ``attn_i −= p_e``                          zeroing ``α^h_ij``, not renormalising
renormalize head h: ``o^h_i ← (o^h_i − p_e)/(1 − α)``  the score set to −∞ (Geva et al. 2023)
patch       ``attn_i += p_e(source run) − p_e``        the edge carries the counterfactual term
mean        ``attn_i += mean_ref p_e − p_e``           mean ablation over the reference batch
=========== ========================================== ==========================================

Every batch row of a forward carries its own edit (``k`` edits × the ``B`` rows of ``tokens``
per forward, up to ``batch_size`` rows). In a causal model an edit of receiver ``i`` changes
nothing before ``i``: edits whose receivers all lie at or after ``p`` (any layers) share a forward
of positions ``p…`` only, reading the clean keys and values of the earlier positions
(``models.prefix``; ``KnockOut.shortcut``) — about ``N/(N − p)`` times less work. Elsewhere (BERT,
a model whose cache does not reproduce the full forward on the run at hand) a forward of edits in
layer ``l`` starts at ``l`` from the clean residual where that is exact, else runs in full. The
metric sees each edit's ``B`` rows in the order of ``tokens``, with all positions (the clean ones
before ``p``). Effects do not add up across heads or edges: they are not a decomposition.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_normmix import memory
from tl_normmix.interventions.edges import Edge, EdgeSet
from tl_normmix.interventions.run import Metric, RunInputs, capture, prepare, resolve_rows
from tl_normmix.maps import MixingMaps
from tl_normmix.maps.mask import check_tokens
from tl_normmix.models.editing import Editor, editor, reads_hidden
from tl_normmix.models.prefix import Prefix, Prefixes

__all__ = ["MODES", "KnockOut", "Mode", "knock_out"]

logger = logging.getLogger("tl_normmix")

#: How an edge is intervened on (module docstring).
Mode = Literal["remove", "renormalize", "patch", "mean"]
MODES: tuple[Mode, ...] = get_args(Mode)


@dataclass(repr=False)
class KnockOut:
    """Effects of single-edge interventions: ``effect[e, b] = metric(edited) − metric(clean)``
    for edge ``edges[e]`` in batch row ``b`` (NaN where the edge does not exist in that row:
    padding, a source after its receiver in a causal model, or renormalising a row's only key)."""

    effect: Float[Tensor, "edge batch"]
    edges: list[Edge]
    mode: Mode
    convention: str
    n_forwards: int
    clean: Float[Tensor, " batch"]
    mask: Bool[Tensor, "batch pos"]
    model_name: str
    n_layers: int
    n_heads: int
    causal: bool
    str_tokens: list[list[str]] | None = field(default=None, repr=False)
    tokens: Tensor | None = field(default=None, repr=False)
    shortcut: bool = False  # some forwards ran only the positions from the receivers on

    def __repr__(self) -> str:
        batch = self.mask.shape[0]
        done = int((~self.effect.isnan()).sum())
        return (
            f"KnockOut({len(self.edges)} edges × {batch} rows ({done} run), mode={self.mode!r}, "
            f"model={self.model_name!r}, {self.convention} weights, {self.n_forwards} forwards"
            + (", causal shortcut" if self.shortcut else "")
            + ")"
        )

    def as_maps(self) -> MixingMaps:
        """The effects as ``MixingMaps`` with scope ``"effect"``: ``maps["effect"]``
        ``[layer, batch, query, key]`` for all-head edges, ``heads["effect"]``
        ``[layer, batch, head, query, key]`` for per-head edges; NaN where no edge was run."""
        batch, pos = self.mask.shape
        layer_map = torch.full((self.n_layers, batch, pos, pos), float("nan"))
        per_head = torch.full((self.n_layers, batch, self.n_heads, pos, pos), float("nan"))
        rows = resolve_rows(self.edges, self.mask, self.causal)
        for index, edge in enumerate(self.edges):
            for b, (i, j) in rows[index].items():
                if edge.head is None:
                    layer_map[edge.layer, b, i, j] = self.effect[index, b]
                else:
                    per_head[edge.layer, b, edge.head, i, j] = self.effect[index, b]
        has_layer = any(e.head is None for e in self.edges)
        has_heads = any(e.head is not None for e in self.edges)
        return MixingMaps(
            layers=tuple(range(self.n_layers)),
            maps={"effect": layer_map} if has_layer or not has_heads else {},
            heads={"effect": per_head} if has_heads else {},
            ratios={},
            mask=self.mask,
            convention=self.convention,
            model_name=self.model_name,
            tokens=self.tokens,
            str_tokens=self.str_tokens,
            causal=self.causal,
        )


def knock_out(
    model: Any,
    tokens: Tensor,
    E: EdgeSet,
    metric: Metric,
    mode: Mode = "remove",
    source_tokens: Tensor | None = None,
    batch_size: int | None = None,
    attention_mask: Tensor | None = None,
    *,
    progress: bool = True,
) -> KnockOut:
    """The exact effect of intervening on each edge of ``E`` alone
    (methods.md#interventions-on-edges).

    Args:
        model: a TransformerLens model tl_normmix supports.
        tokens: ``[batch, pos]`` token ids (a batch of prompts of one length, padded if needed).
        E: the edges (``nm.edges(...)`` or ``nm.edges.top(...)``).
        metric: ``metric(logits [batch, pos, vocab]) -> [batch]``; wrapped with
            ``nm.on_hidden_states`` it reads the last block's output instead (encoders).
        mode: ``remove``, ``renormalize``, ``patch`` (needs ``source_tokens`` of the same shape)
            or ``mean`` (needs ``source_tokens``: the reference batch, same length).
        batch_size: rows per forward (default: as many as fill the memory budget,
            ``tl_normmix.memory``).
        attention_mask: ``[batch, pos]`` padding mask (1 = token), passed to the model.
        progress: a progress bar over the edges.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {', '.join(MODES)}.")
    ed = editor(model)
    spec = ed.adapter.spec
    tokens = check_tokens(tokens)
    pos = tokens.shape[-1]
    edges = E.resolve(spec.n_layers, spec.block.n_heads, pos)
    layers = sorted({e.layer for e in edges})
    inputs = prepare(ed, tokens, metric, layers, attention_mask)
    source = _source_terms(ed, mode, source_tokens, inputs, layers)
    rows = resolve_rows(edges, inputs.mask, spec.causal)
    batch = inputs.tokens.shape[0]
    effect = torch.full((len(edges), batch), float("nan"))
    bar = tqdm(total=len(edges), desc="knock_out", unit="edge", disable=not progress)
    runner = _Runner(ed, mode, inputs, source, edges, rows, metric, effect, bar)
    prefixes = Prefixes.of(ed, inputs.tokens, attention_mask, inputs.clean_out, runner.hidden)
    if prefixes is None:
        logger.info("knock_out: no causal shortcut on %s (full forwards)", spec.model_name)
    full_path: list[int] = []
    shortcut = False
    # Causal models: edits whose receivers all lie at or after p re-run only positions p… from
    # the clean keys and values of the earlier ones (models.prefix), many layers per forward.
    for p, indices in _by_first_receiver(rows):
        prefix = prefixes.build(p) if prefixes is not None else None
        if prefix is None:
            if prefixes is not None:
                logger.info("knock_out: the shortcut from position %d failed its check", p)
            full_path.extend(indices)
            continue
        shortcut = True
        with torch.no_grad():  # the clean metric as the shortcut computes it, once per prefix
            clean = metric(prefix.baseline()).detach().float().cpu()
        per_forward = max(1, (batch_size or _default_rows(ed, pos, pos - p)) // batch)
        for first in range(0, len(indices), per_forward):
            runner.run_suffix(prefix, indices[first : first + per_forward], clean)
        del prefix
    # Everything else: a forward per chunk of one layer's edits, starting at that layer from
    # the clean residual where that reproduces the full forward on this run.
    per_forward = max(1, (batch_size or _default_rows(ed, pos, pos)) // batch)
    layers_left = sorted({edges[k].layer for k in full_path})
    resid = {layer: inputs.cache[ed.resid_pre(layer)] for layer in layers_left}
    start = ed.start_is_exact(inputs.tokens, attention_mask, resid, inputs.clean_out)
    if layers_left:
        logger.info(
            "knock_out: %d edges by full forwards (starting at their layer: %s)",
            len(full_path),
            start,
        )
    for layer in layers_left:
        indices = [k for k in full_path if edges[k].layer == layer]
        for first in range(0, len(indices), per_forward):
            runner.run_full(indices[first : first + per_forward], resid[layer] if start else None)
    bar.update(len(edges) - bar.n)  # edges that exist in no row need no forward
    bar.close()
    return KnockOut(
        effect=effect,
        edges=edges,
        mode=mode,
        convention=spec.convention,
        n_forwards=runner.n_forwards + (prefixes.n_forwards if prefixes is not None else 0),
        shortcut=shortcut,
        clean=inputs.clean_metric.cpu(),
        mask=inputs.mask.cpu(),
        model_name=spec.model_name,
        n_layers=spec.n_layers,
        n_heads=spec.block.n_heads,
        causal=spec.causal,
        str_tokens=ed.adapter.str_tokens(inputs.tokens.cpu()),
        tokens=inputs.tokens.cpu(),
    )


def _default_rows(ed: Editor, pos: int, positions: int) -> int:
    """Rows per forward that fill the memory budget when each row runs ``positions`` of its
    ``pos`` tokens (the rest read from a copy of the clean keys and values). The copy is counted
    per query head although the caches hold key-value heads: what the forward holds beyond this
    count is of that size (``scripts/bench_patching.py`` measures the peak)."""
    block = ed.adapter.spec.block
    vocab = int(getattr(ed.model.cfg, "d_vocab", 0) or 0)
    activations = 4 * positions * (16 * block.d_model + 4 * block.n_heads * pos + vocab)
    past = 8 * ed.n_layers * (pos - positions) * block.n_heads * block.d_head  # K and V
    return memory.rows_per_chunk(activations + past, 2**31, what="knock_out rows per forward")


def _by_first_receiver(
    rows: Sequence[dict[int, tuple[int, int]]],
) -> list[tuple[int, list[int]]]:
    """Edges grouped by their earliest receiver position over the batch rows, latest first
    (edges that exist in no row need no forward and are left out)."""
    groups: dict[int, list[int]] = {}
    for k, per_row in enumerate(rows):
        if per_row:
            groups.setdefault(min(i for i, _ in per_row.values()), []).append(k)
    return sorted(groups.items(), reverse=True)


class _Runner:
    """The forwards of chunks of edits, and the effects they measure (``effect``, in place)."""

    def __init__(
        self,
        ed: Editor,
        mode: Mode,
        inputs: RunInputs,
        source: _Source | None,
        edges: list[Edge],
        rows: list[dict[int, tuple[int, int]]],
        metric: Metric,
        effect: Tensor,
        bar: Any,
    ) -> None:
        self.ed, self.mode, self.inputs, self.source = ed, mode, inputs, source
        self.edges, self.rows, self.metric, self.effect = edges, rows, metric, effect
        self.bar = bar
        self.batch = inputs.tokens.shape[0]
        self.hidden = reads_hidden(metric)
        self.n_forwards = 1  # the clean run

    def _hooks(
        self, chunk: Sequence[int], offset: int
    ) -> tuple[list[tuple[str, Callable[..., Any]]], list[tuple[int, int, set[int]]]]:
        """One ``hook_z`` edit per layer of ``chunk`` (edit ``chunk[slot]`` in rows ``slot·B…``),
        and per edit ``(slot, edge index, rows where it exists)``."""
        by_layer: dict[int, list[int]] = {}
        for slot, k in enumerate(chunk):
            by_layer.setdefault(self.edges[k].layer, []).append(slot)
        hooks: list[tuple[str, Callable[..., Any]]] = []
        valid: list[tuple[int, int, set[int]]] = []
        for layer, slots in by_layer.items():
            hook = _EditHook(
                self.ed,
                self.mode,
                self.inputs,
                self.source,
                layer,
                [self.edges[chunk[slot]] for slot in slots],
                [self.rows[chunk[slot]] for slot in slots],
                slots=slots,
                offset=offset,
            )
            hooks.append((self.ed.z(layer), hook.edit))
            valid.extend(
                (slot, chunk[slot], ok) for slot, ok in zip(slots, hook.valid, strict=True)
            )
        return hooks, valid

    def _record(
        self, out_of: Callable[[int], Tensor], clean: Tensor, valid: list[tuple[int, int, set[int]]]
    ) -> None:
        for slot, k, ok in valid:
            value = self.metric(out_of(slot)).detach().float().cpu()
            diff = value - clean
            keep = torch.zeros(self.batch, dtype=torch.bool)
            keep[list(ok)] = True
            self.effect[k] = torch.where(keep, diff, torch.full_like(diff, float("nan")))

    def run_suffix(self, prefix: Prefix, chunk: Sequence[int], clean: Tensor) -> None:
        """Edits whose receivers lie at or after ``prefix.p``, any layers, in one forward of
        the positions from ``p`` on; ``clean``: the metric of ``prefix.baseline()``."""
        hooks, valid = self._hooks(chunk, prefix.p)
        batch = self.batch
        with torch.no_grad():
            out = prefix.run(len(chunk), hooks)
            self._record(lambda s: prefix.full(out[s * batch : (s + 1) * batch]), clean, valid)
        self.n_forwards += 1
        self.bar.update(len(chunk))

    def run_full(self, chunk: Sequence[int], resid: Tensor | None) -> None:
        """Edits of one layer in one full forward (from that layer's clean residual if given)."""
        layer = self.edges[chunk[0]].layer
        hooks, valid = self._hooks(chunk, 0)
        inputs, repeat = self.inputs, len(chunk)
        kwargs: dict[str, Any] = {}
        if resid is not None and layer > 0:
            kwargs = {"start_at_layer": layer, "resid": resid.repeat(repeat, 1, 1)}
        mask = inputs.attention_mask
        with torch.no_grad():
            out = self.ed.run(
                inputs.tokens.repeat(repeat, 1),
                hooks,
                attention_mask=mask.repeat(repeat, 1) if mask is not None else None,
                hidden=self.hidden,
                **kwargs,
            )
            batch = self.batch
            clean = inputs.clean_metric.cpu()
            self._record(lambda s: out[s * batch : (s + 1) * batch], clean, valid)
        self.n_forwards += 1
        self.bar.update(len(chunk))


@dataclass
class _Source:
    """The counterfactual terms ``α'^h_ij v'^h_j`` a ``patch`` or ``mean`` edit writes."""

    pattern: dict[int, Tensor]  # layer -> [batch', head, q, k]
    v: dict[int, Tensor]  # layer -> [batch', pos, head, d_head]
    mean: bool


def _source_terms(
    ed: Editor,
    mode: Mode,
    source_tokens: Tensor | None,
    inputs: RunInputs,
    layers: Sequence[int],
) -> _Source | None:
    if mode not in ("patch", "mean"):
        return None
    if source_tokens is None:
        raise ValueError(
            f"mode={mode!r} needs source_tokens: the counterfactual run ('patch', same shape as "
            "tokens) or the reference batch ('mean', same length)."
        )
    source = check_tokens(source_tokens, "source_tokens")
    if source.shape[-1] != inputs.tokens.shape[-1] or (
        mode == "patch" and source.shape != inputs.tokens.shape
    ):
        raise ValueError(
            f"source_tokens has shape {tuple(source.shape)} but tokens "
            f"{tuple(inputs.tokens.shape)}: mode={mode!r} needs "
            + ("the same shape." if mode == "patch" else "the same length.")
        )
    names = [n for layer in layers for n in (ed.pattern(layer), ed.v(layer))]
    cache: dict[str, Tensor] = {}
    with torch.no_grad():
        ed.run(source.to(ed.device), [(n, capture(cache, n)) for n in names])
    return _Source(
        pattern={layer: cache[ed.pattern(layer)].float() for layer in layers},
        v={layer: ed.v_heads(cache[ed.v(layer)].float()) for layer in layers},
        mean=mode == "mean",
    )


class _EditHook:
    """The ``hook_z`` edit of one layer in one forward: edit ``n`` in rows ``slots[n]·B…``;
    the hook sees positions from ``offset`` on."""

    def __init__(
        self,
        ed: Editor,
        mode: Mode,
        inputs: RunInputs,
        source: _Source | None,
        layer: int,
        edges: list[Edge],
        rows: list[dict[int, tuple[int, int]]],
        slots: Sequence[int] | None = None,
        offset: int = 0,
    ) -> None:
        batch = inputs.tokens.shape[0]
        pattern = inputs.cache[ed.pattern(layer)].float()  # [B, H, q, k]
        v = ed.v_heads(inputs.cache[ed.v(layer)].float())  # [B, pos, H, d]
        heads = pattern.shape[1]
        self.mode = mode
        self.valid: list[set[int]] = []
        entries: list[tuple[int, int, int, int, int, int | None]] = []  # row, b, i, j, slot, h
        slots = range(len(edges)) if slots is None else slots
        for slot, edge, per_row in zip(slots, edges, rows, strict=True):
            ok = set()
            for b, (i, j) in per_row.items():
                if mode == "renormalize":
                    alpha = (
                        pattern[b, :, i, j] if edge.head is None else pattern[b, edge.head, i, j]
                    )
                    if bool((alpha >= 1.0).any()):
                        continue  # the row's only key: knocking it out leaves nothing
                ok.add(b)
                entries.append((slot * batch + b, b, i, j, slot, edge.head))
            self.valid.append(ok)
        self.rows = torch.tensor([e[0] for e in entries], dtype=torch.long)
        self.positions = torch.tensor([e[2] for e in entries], dtype=torch.long)
        head_mask = torch.zeros(len(entries), heads, dtype=torch.bool)
        for n, entry in enumerate(entries):
            if entry[5] is None:
                head_mask[n] = True
            else:
                head_mask[n, entry[5]] = True
        b_index = torch.tensor([e[1] for e in entries], dtype=torch.long)
        i_index = self.positions
        j_index = torch.tensor([e[3] for e in entries], dtype=torch.long)
        device = pattern.device
        b_index, i_index, j_index = b_index.to(device), i_index.to(device), j_index.to(device)
        head_mask = head_mask.to(device)
        alpha = pattern[b_index, :, i_index, j_index]  # [M, H]
        term = alpha[..., None] * v[b_index, j_index]  # [M, H, d]: α^h_ij v^h_j
        self.head_mask = head_mask
        self.alpha = alpha
        self.term = term * head_mask[..., None]
        if mode == "renormalize":
            # (o − α_ij v_j)/(1 − α_ij) from the other terms themselves: as α_ij → 1 the
            # difference would lose every digit. With attention sinks (rows summing to < 1) the
            # sink's mass stays in the denominator, as a −∞ score leaves it in the softmax.
            rows_alpha = pattern[b_index, :, i_index]  # [M, H, key]
            others = rows_alpha.clone()
            others[torch.arange(len(entries), device=device), :, j_index] = 0.0
            values = v[b_index]  # [M, key, H, d]
            self.rest = torch.einsum("mhk,mkhd->mhd", others, values)
            sink = (1.0 - rows_alpha.sum(-1)).clamp_min(0.0)
            self.denominator = others.sum(-1) + torch.where(sink > 1e-4, sink, 0.0)
        if source is not None:
            src_pattern, src_v = source.pattern[layer], source.v[layer]
            if source.mean:
                mean = (
                    src_pattern[:, :, i_index, j_index].permute(0, 2, 1)[..., None]
                    * src_v[:, j_index]
                ).mean(0)  # [M, H, d]
                counterfactual = mean
            else:
                counterfactual = (
                    src_pattern[b_index, :, i_index, j_index][..., None] * src_v[b_index, j_index]
                )
            self.delta = (counterfactual - term) * head_mask[..., None]
        else:
            self.delta = -self.term
        self.rows, self.positions = self.rows.to(device), (self.positions - offset).to(device)

    def edit(self, z: Tensor, hook: Any) -> Tensor:
        if self.rows.numel() == 0:
            return z
        z = z.clone()
        # [rows, pos, head, d_head], whatever reshape of the flat per-head values the hook shows
        heads = z.view(*z.shape[:2], *self.delta.shape[1:])
        delta = self.delta.to(z.dtype)
        if self.mode == "renormalize":  # per head: (o − p)/(1 − α) on the edited heads
            live = heads[self.rows, self.positions].float()  # [M, H, d]
            scale = self.denominator.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
            renormed = self.rest / scale
            delta = torch.where(self.head_mask[..., None], renormed - live, 0.0).to(z.dtype)
        heads.index_put_((self.rows, self.positions), delta, accumulate=True)
        return z
