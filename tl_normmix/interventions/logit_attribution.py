"""Signed attribution to a target: which source, through which head, moved this logit
(methods.md#signed-attribution-to-a-target).

The model's logit (or a logit difference, or any readout direction) at one position is a linear
readout of the final stream once the final norm is frozen at the scale of the real final stream
there. Walking the blocks from last to first, every norm chain on the way is frozen at the same
position (``decompose.readout``), so the readout splits exactly into

    embed + Σ_l [Σ_h Σ_j α^h_pj (v^h_j W_O^h)·ρ_l + attn_bias_l + mlp_l + norm_bias_l] + final_bias

— the direct effect of every edge ``(l, h, j → p)``, each block's feed-forward write, the biases and
the embedding of ``p``. ``tracked`` carries each layer's row back to the input tokens: through the
ALTI rollout of the layers below (ALTI-Logit, Ferrando et al. 2023) or exactly, through
``decompose_model``'s carried parts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_normmix.aggregate.decomposition import carried_blocks, read_layer
from tl_normmix.aggregate.rollouts import rollout
from tl_normmix.decompose import attention, readout
from tl_normmix.decompose.attention_block import norm_chain
from tl_normmix.decompose.blocks import LayerTensors
from tl_normmix.decompose.residual import through_bias
from tl_normmix.interventions.logit_readout import Readout, Target
from tl_normmix.maps import MixingMaps, hook_filter, mixing_maps
from tl_normmix.maps.completeness import warn_if_residual
from tl_normmix.maps.mask import check_tokens, resolve_mask
from tl_normmix.models.adapter import ModelAdapter, adapt

__all__ = ["TRACKERS", "LogitAttribution", "logit_attribution"]

TrackMethod = Literal["alti", "exact"]


@dataclass
class LogitAttribution:
    """The readout at ``position`` split into signed parts (docs: guides, logit attribution).

    Attributes:
        heads: ``[layer, batch, head, source]``: the direct effect of edge ``(l, h, source →
            position)``, ``α^h_pj (v^h_j W_O^h)·ρ_l`` (``b_V`` inside ``v``); zero at padding.
        layers: ``[layer, batch, source]``: ``heads`` summed over heads.
        terms: every other part of the readout: ``embed`` ``[batch]`` (the embedding of
            ``position``), ``attn_bias`` ``[layer, batch]`` (``b_O`` and the attention output's own
            norm biases), ``mlp`` ``[layer, batch]`` (the feed-forward write, after its own
            norms), ``norm_bias`` ``[layer, batch]`` (the biases of the norms over the residual
            stream: post-LN blocks), ``final_bias`` ``[batch]`` (the final norm's ``β`` and the
            unembedding bias).
        total: ``[batch]``: the sum of every part.
        actual: ``[batch]``: the model's own readout, from the cached final stream through the
            model's own final norm and unembedding (before any final softcap).
        residual: ``[batch]``: ``|total − actual|`` relative to ``‖x‖·‖ρ‖`` (the final stream
            and its readout vector: a bound on the readout of a stream of that size).
        position: ``[batch]``: the position read in each row.
        target, foil: ``[batch]`` token ids (None where a ``direction`` was given / no foil).
        softcap: the model's final logit softcap (``cap·tanh(z/cap)``), None without one: the
            parts split the logit before it.
        readouts: ``[layer, batch, d_model]``: the readout vector ``ρ`` of each block's output.
        str_tokens: token strings per batch row, where ``tokens`` were given.
    """

    heads: Float[Tensor, "layer batch head_index source"]
    layers: Float[Tensor, "layer batch source"]
    terms: dict[str, Tensor]
    total: Float[Tensor, " batch"]
    actual: Float[Tensor, " batch"]
    residual: Float[Tensor, " batch"]
    position: Int[Tensor, " batch"]
    target: Int[Tensor, " batch"] | None
    foil: Int[Tensor, " batch"] | None
    softcap: float | None
    readouts: Float[Tensor, "layer batch d_model"]
    mask: Bool[Tensor, "batch pos"]
    model_name: str
    convention: str
    causal: bool
    str_tokens: list[list[str]] | None = None
    _run: Any = field(default=None, repr=False, compare=False)
    _tracked: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)

    def __repr__(self) -> str:
        n_layers, batch, n_heads, n = self.heads.shape
        what = (
            "direction"
            if self.target is None
            else "target" + (" − foil" if self.foil is not None else "")
        )
        return (
            f"LogitAttribution({self.model_name}, {what}, batch={batch}, layers={n_layers}, "
            f"heads={n_heads}, sources={n}, residual={float(self.residual.max()):.1e})"
        )

    def tracked(self, method: TrackMethod = "alti") -> Float[Tensor, "layer batch source"]:
        """Each layer's row carried to the input tokens (``TRACKERS``): ``"alti"`` through the
        ALTI rollout of the layers below (ALTI-Logit), ``"exact"`` through ``decompose_model``'s
        parts — whose rows sum with ``untracked("exact")`` to ``total``. Computed on first call
        from the cache the attribution was made from."""
        if method not in TRACKERS:
            raise ValueError(f"tracked({method!r}): choose one of {sorted(TRACKERS)}.")
        if method not in self._tracked:
            if self._run is None:
                raise ValueError("This attribution no longer holds its run; compute it again.")
            rows, rest = TRACKERS[method](self, self._run)
            self._tracked[method] = rows
            self._tracked[f"{method}.rest"] = rest
        return self._tracked[method]

    def untracked(self, method: TrackMethod = "alti") -> Float[Tensor, " batch"]:
        """What ``tracked(method)`` leaves to no input token: for ``"exact"`` the bias parts of
        the carried decomposition read out plus ``final_bias``; for ``"alti"`` ``total`` minus
        its rows (the embedding, the feed-forward writes and the biases, which ALTI-Logit does not
        track)."""
        self.tracked(method)
        return self._tracked[f"{method}.rest"]

    def as_maps(self, tracked: TrackMethod | None = None) -> MixingMaps:
        """As ``MixingMaps`` (absolute values, to rank edges): scope ``"logit"`` with the direct
        effects in the row of ``position`` of each layer (per head too), and, given ``tracked``,
        scope ``"logit_<method>"`` with the tracked rows."""
        n_layers, batch, n_heads, n = self.heads.shape
        rows = torch.arange(batch, device=self.position.device)
        full = self.heads.new_zeros(n_layers, batch, n, n)
        full[:, rows, self.position] = self.layers.abs()
        heads = self.heads.new_zeros(n_layers, batch, n_heads, n, n)
        heads[:, rows, :, self.position] = self.heads.abs().transpose(0, 1)  # [batch, layer, ...]
        maps = {"logit": full}
        if tracked is not None:
            chosen = full.new_zeros(full.shape)
            chosen[:, rows, self.position] = self.tracked(tracked).abs().float()
            maps[f"logit_{tracked}"] = chosen
        return MixingMaps(
            layers=tuple(range(n_layers)),
            maps=maps,
            heads={"logit": heads},
            ratios={},
            mask=self.mask,
            convention=self.convention,
            model_name=self.model_name,
            causal=self.causal,
        )


@dataclass(frozen=True)
class _Run:
    """What a tracker needs of the run an attribution was made from."""

    model: Any
    cache: Any
    mask: Tensor


@torch.no_grad()
def logit_attribution(
    model: Any,
    cache: Any = None,
    target: Target | None = None,
    foil: Target | None = None,
    position: int | Tensor = -1,
    tokens: Tensor | None = None,
    direction: Tensor | None = None,
    *,
    attention_mask: Tensor | None = None,
) -> LogitAttribution:
    """Split the logit of ``target`` (minus ``foil``'s), or the readout ``direction``, at
    ``position`` over every edge, head, block and bias of a cached run.

    Args:
        model: the TransformerLens model that made ``cache``.
        cache: from ``run_with_cache(tokens, names_filter=nm.hook_filter(model, "layer_n"))``;
            None: the model is run on ``tokens`` with that filter.
        target, foil: token ids or single-token strings, one for all rows or one per row.
        position: the position read (negative from the end), one for all rows or ``[batch]``.
        tokens: the run's tokens (for the padding mask, as for ``mixing_maps``).
        direction: ``[d_model]`` or ``[batch, d_model]``, read from the final normalised stream
            (a probe, an SAE or transcoder encoder row) instead of an unembedding difference.
        attention_mask: the run's padding, as for ``mixing_maps``.
    """
    adapter = adapt(model)
    if (target is None) == (direction is None):
        raise ValueError("Pass either a target (with an optional foil) or a direction.")
    tokens = check_tokens(tokens) if tokens is not None else None
    if cache is None:
        if tokens is None:
            raise ValueError("Pass a cache, or the tokens to run the model on.")
        device = next(model.parameters()).device
        _, cache = model.run_with_cache(
            tokens.to(device), names_filter=hook_filter(model, "layer_n", verify=False)
        )
    n_layers = adapter.spec.n_layers
    last = _read(adapter, cache, n_layers - 1, extra=frozenset({"resid_post"}))
    mask = resolve_mask(adapter, attention_mask, tokens, last)
    pos = _positions(position, mask)
    batch = mask.shape[0]
    rows = torch.arange(batch, device=mask.device)
    final_stream = last["resid_post"][rows, pos]  # [batch, d]
    head = Readout.of(model, adapter, target, foil, direction, batch, final_stream.device)
    rho, final_bias = head.readout(final_stream)
    actual = head.actual(final_stream)
    # |x·ρ| ≤ ‖x‖·‖ρ‖: the largest readout a stream of this size could give
    scale = (final_stream.norm(dim=-1) * rho.norm(dim=-1)).clamp_min(torch.finfo(rho.dtype).tiny)

    heads = final_stream.new_zeros(n_layers, batch, adapter.spec.block.n_heads, mask.shape[1])
    terms = {k: final_stream.new_zeros(n_layers, batch) for k in ("attn_bias", "mlp", "norm_bias")}
    readouts = final_stream.new_zeros(n_layers, batch, final_stream.shape[-1])
    embed = final_stream.new_zeros(batch)
    for layer in range(n_layers - 1, -1, -1):
        t = last if layer == n_layers - 1 else _read(adapter, cache, layer)
        readouts[layer] = rho
        parts = _block(t, rho, pos, mask)
        heads[layer], rho = parts.heads, parts.rho_in
        terms["attn_bias"][layer] = parts.attn_bias
        terms["mlp"][layer] = parts.mlp
        terms["norm_bias"][layer] = parts.norm_bias
        if layer == 0:
            embed = (t["resid_pre"][rows, pos] * rho).sum(-1)
    out_terms: dict[str, Tensor] = {"embed": embed, **terms, "final_bias": final_bias}
    total = heads.sum((0, 2, 3)) + embed + sum(terms[k].sum(0) for k in terms) + final_bias
    residual = (total - actual).abs() / scale
    warn_if_residual(residual, last.precision, "logit_attribution", "la.residual")
    return LogitAttribution(
        heads=heads,
        layers=heads.sum(2),
        terms=out_terms,
        total=total,
        actual=actual,
        residual=residual,
        position=pos,
        target=head.target,
        foil=head.foil,
        softcap=head.softcap,
        readouts=readouts,
        mask=mask,
        model_name=adapter.spec.model_name,
        convention=adapter.spec.convention,
        causal=adapter.spec.causal,
        str_tokens=adapter.str_tokens(tokens) if tokens is not None else None,
        _run=_Run(model, cache, mask),
    )


# -- one block, read backward --------------------------------------------------------------------
@dataclass
class _BlockParts:
    heads: Float[Tensor, "batch head_index source"]
    attn_bias: Float[Tensor, " batch"]
    mlp: Float[Tensor, " batch"]
    norm_bias: Float[Tensor, " batch"]
    rho_in: Float[Tensor, "batch d_model"]


def _block(t: LayerTensors, rho: Tensor, pos: Tensor, mask: Tensor) -> _BlockParts:
    """The parts of one block's write read by ``rho`` (the readout of its output at ``pos``)
    and the readout of its input (methods.md#signed-attribution-to-a-target)."""
    layout = t.layout
    rows = torch.arange(rho.shape[0], device=rho.device)

    def at(names: tuple[str, ...]) -> list[tuple[Any, Tensor]]:
        return [(t.norms[n], t.scale(n)[rows, pos]) for n in names]

    rho_branch, norm_bias = readout.pull_back_chain(at(layout.post), rho)
    mlp = rho.new_zeros(rho.shape[0])
    if layout.has_mlp:
        written = through_bias(norm_chain(t, layout.mlp_out), t["mlp_out"])[rows, pos]
        mlp = (written * rho_branch).sum(-1)
    rho_mid = rho_branch
    if not layout.parallel:
        rho_mid, mid_bias = readout.pull_back_chain(at(layout.mid), rho_branch)
        norm_bias = norm_bias + mid_bias
    rho_attn, attn_bias = readout.pull_back_chain(at(layout.attn_out), rho_mid)
    attn_bias = attn_bias + rho_attn @ t.b_O
    pattern = attention.masked_pattern(t.pattern, mask)[rows, :, pos]  # [batch, head, source]
    heads = readout.head_source_terms(pattern, t.v, t.W_O, rho_attn)
    return _BlockParts(heads, attn_bias, mlp, norm_bias, rho_mid)


def _positions(position: int | Tensor, mask: Tensor) -> Int[Tensor, " batch"]:
    batch, n = mask.shape
    pos = torch.as_tensor(position, device=mask.device).long().reshape(-1)
    if pos.numel() == 1:
        pos = pos.expand(batch)
    if pos.numel() != batch:
        raise ValueError(f"position: {pos.numel()} positions for a batch of {batch} rows.")
    if bool(((pos < -n) | (pos >= n)).any()):
        raise IndexError(f"position {pos.tolist()} is outside the {n} positions of the run.")
    pos = pos % n
    padded = ~mask[torch.arange(batch, device=mask.device), pos]
    if bool(padded.any()):
        rows = padded.nonzero()[:, 0].tolist()
        raise ValueError(
            f"position {pos.tolist()} is padding in batch row(s) {rows}: pass one position per "
            "row, e.g. position=mask.sum(1) - 1 for the last real token of right-padded rows."
        )
    return pos


def _read(
    adapter: ModelAdapter, cache: Any, layer: int, extra: frozenset[str] = frozenset()
) -> LayerTensors:
    layout = adapter.layout
    roles = {"pattern", "v", "attn_out", "resid_pre", *extra}
    if layout.has_mlp:
        roles.add("mlp_out")
    roles |= {f"{n}.scale" for n in (*layout.attn_out, *layout.mid, *layout.mlp_out, *layout.post)}
    return read_layer(adapter, cache, layer, roles, "logit_attribution")


# -- trackers: each layer's row carried to the input tokens ---------------------------------------
Tracker = Callable[[LogitAttribution, _Run], tuple[Tensor, Tensor]]


def _alti(la: LogitAttribution, run: _Run) -> tuple[Tensor, Tensor]:
    """ALTI-Logit: layer ``l``'s row times the ALTI rollout of layers ``0 … l−1``
    (methods.md#signed-attribution-to-a-target)."""
    n_layers = la.layers.shape[0]
    rows = [la.layers[0]]
    if n_layers > 1:
        maps = mixing_maps(
            run.model, run.cache, "alti", layers=range(n_layers - 1), attention_mask=run.mask
        )
        chained = rollout(maps, "alti")  # [layer, batch, query, key], float64
        for layer in range(1, n_layers):
            row = torch.einsum("bj,bjk->bk", la.layers[layer].double(), chained[layer - 1])
            rows.append(row.to(la.layers.dtype))
    tracked = torch.stack(rows)
    return tracked, la.total - tracked.sum((0, 2))


def _exact(la: LogitAttribution, run: _Run) -> tuple[Tensor, Tensor]:
    """Through ``decompose_model``'s carried parts: ``P_l[k] = D^l_pk · ρ_l`` at each block's
    output; row ``l`` is ``P_l − P_{l−1}`` (row 0: ``P_0``), so the rows telescope to the final
    parts and sum, with the carried bias read out and ``final_bias``, to ``total``."""
    rows = torch.arange(la.layers.shape[1], device=la.position.device)
    out = la.layers.new_zeros(la.layers.shape)
    previous: Tensor | None = None
    last = la.layers.shape[0] - 1
    blocks = carried_blocks(run.model, run.cache, last, attention_mask=run.mask)  # a progress bar
    for layer, _, carried, _ in blocks:
        now = torch.einsum("bkd,bd->bk", carried.parts[rows, la.position], la.readouts[layer])
        out[layer] = now if previous is None else now - previous
        previous = now
    bias = (carried.bias[rows, la.position] * la.readouts[last]).sum(-1)
    return out, bias + la.terms["final_bias"]


#: The ways ``LogitAttribution.tracked`` carries a layer's row to the input tokens.
TRACKERS: dict[str, Tracker] = {"alti": _alti, "exact": _exact}
