"""The self-contained HTML report of one text on one model (``tl-normmix report``).

It runs the model once with only the hooks it needs, computes the maps of the chosen scopes and
layers (with a progress bar), and writes one HTML file: a header (model, TransformerLens version,
weight convention, completeness residuals), the plots (embedded PNG), and per layer the scopes
side by side, the per-head maps by weight and by norm, the value norms, and where the last token
reads from / the first token writes to. Everything works offline (``render.page``).

The output file appears only when the report is complete (written to a temporary file in the same
folder, then renamed); on any error nothing is left behind.
"""

from __future__ import annotations

import html
import importlib.metadata
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tl_normmix.aggregate import decompose_model, rollout
from tl_normmix.interventions.logit_attribution import logit_attribution
from tl_normmix.interventions.value_zeroing import value_zeroing
from tl_normmix.maps import SCOPES, MixingMaps, hook_filter, mixing_maps, run_mixing_maps
from tl_normmix.models.adapter import adapt
from tl_normmix.models.errors import UnsupportedModelError
from tl_normmix.render import plots, views
from tl_normmix.render.page import Block, Item, page

__all__ = ["build_report", "default_scopes"]

#: Views of ``n × n`` matrices grow as ``n²`` per layer (per head: ``H·n²``); above these lengths
#: the report leaves them out (and says so) so that it stays a file one can open and send.
MATRIX_MAX_TOKENS = 256
HEADS_MAX_TOKENS = 128

_CONVENTIONS = {
    "raw": "raw (unprocessed) weights — the papers' convention: b_V inside f, b_O and the layer "
    "norm's β attributed to no token",
    "processed": "processed weights (folded layer norms, centred writing weights, value biases "
    "folded into b_O): maps differ from the papers' convention",
}


def default_scopes(model: Any) -> tuple[str, ...]:
    """Weights, norms, + residual, + layer norm (where the block has one) and the whole layer."""
    layout = adapt(model).layout
    if SCOPES["attnresln_n"].refusal(layout):  # no norm reads attention + residual
        return ("attn_w", "attn_n", "attnres_n", "layer_n")
    return ("attn_w", "attn_n", "attnres_n", "attnresln_n", "layer_n")


def build_report(
    model: Any,
    tokens: torch.Tensor,
    *,
    scopes: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    progress: bool = False,
    new_id: Callable[[], str] | None = None,
    title: str | None = None,
    methods: bool = True,
    target: str | int | None = None,
    foil: str | int | None = None,
) -> str:
    """The report's HTML for ``tokens`` (``[1, pos]``) on ``model``; ``methods``: add the
    "methods compared" section (up to ``MATRIX_MAX_TOKENS`` tokens); ``target`` (and ``foil``):
    add the "attribution" section — the last token's logit of ``target`` (minus ``foil``'s)
    split over layers, heads and sources (``nm.logit_attribution``)."""
    start = time.perf_counter()
    scopes = tuple(scopes) if scopes is not None else default_scopes(model)
    chosen = list(layers) if layers is not None else None
    n = int(tokens.shape[-1])
    if n > MATRIX_MAX_TOKENS:  # statistics computed during the forward pass, no N×N maps
        maps = run_mixing_maps(
            model,
            tokens,
            scopes,
            layers=chosen,
            keep="stats",
            value_norms=True,
            progress=progress,
        )
    else:
        names = hook_filter(model, scopes, value_norms=True)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=names)
        maps = mixing_maps(
            model,
            cache,
            scopes,
            layers=chosen,
            tokens=tokens,
            value_norms=True,
            progress=progress,
        )
        del cache
    items = _plots(maps)
    if target is not None:
        items += _attribution(model, tokens, target, foil)
    elif foil is not None:
        raise ValueError("A foil needs a target (--target).")
    if methods:
        items += _methods(model, tokens, maps, progress)
    layer_items = _layer if maps.maps else _layer_statistics
    items += [item for layer in maps.layers for item in layer_items(maps, layer)]
    seconds = time.perf_counter() - start
    name = maps.model_name
    return page(
        items,
        title=title or f"tl_normmix report — {name}",
        header=_header(model, maps, seconds),
        new_id=new_id,
    )


def _plots(maps: MixingMaps) -> list[Item]:
    items: list[Item] = [
        plots.figure_block(
            plots.mixing_ratios(maps),
            title="Mixing ratio per layer",
            caption="share of each token's update that comes from the other tokens",
        )
    ]
    if not maps.maps:  # statistics only (a long text)
        items.append(
            plots.figure_block(
                plots.reach(maps),
                title="Where tokens read from",
                caption="mean share of each row from the first token and from the previous "
                "tokens, by scope (statistics computed during the forward pass)",
            )
        )
        return items
    if {"attn_w", "attn_n"} <= set(maps.scopes):
        items.append(
            plots.figure_block(
                plots.sink_shares(maps),
                title="Sink share: weight vs norm",
                caption="attention weight the first token receives, and its share once the "
                "vectors it writes are measured (Kobayashi et al. 2020)",
            )
        )
    if len(maps.scopes) > 1:
        items.append(
            plots.figure_block(
                plots.contextualization_changes(maps),
                title="Contextualization change between consecutive scopes",
                caption="1 − Spearman ρ between the maps over the valid cells",
            )
        )
    return items


def _attribution(model: Any, tokens: torch.Tensor, target: Any, foil: Any) -> list[Item]:
    """The last token's logit (difference) split over layers, heads and sources
    (methods.md#signed-attribution-to-a-target)."""
    items: list[Item] = [Block('<h2 id="attribution">Attribution to the target</h2>')]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook_filter(model, "layer_n"))
    la = logit_attribution(model, cache, target, foil=foil, tokens=tokens)
    name = "logit" if foil is None else "logit difference"
    terms = la.terms
    biases = (
        terms["attn_bias"][:, 0].sum() + terms["norm_bias"][:, 0].sum() + terms["final_bias"][0]
    )
    rows = [
        (name, f"{float(la.actual[0]):.4g} (the parts sum to {float(la.total[0]):.4g})"),
        ("embedding of the last token", f"{float(la.terms['embed'][0]):.4g}"),
        ("attention edges (all layers)", f"{float(la.heads[:, 0].sum()):.4g}"),
        ("feed-forward writes", f"{float(la.terms['mlp'][:, 0].sum()):.4g}"),
        ("biases", f"{float(biases):.4g}"),
    ]
    if la.softcap is not None:
        rows.append(("final softcap", f"{la.softcap:g} (the parts split the logit before it)"))
    table = "".join(
        f"<tr><th>{html.escape(k)}</th><td style='text-align:left'>{html.escape(v)}</td></tr>"
        for k, v in rows
    )
    items.append(Block(f'<table class="tlnm-header">{table}</table>'))
    items.append(views.logit_tokens(la))
    items.append(views.logit_tokens(la, tracked="alti"))
    items.append(views.logit_layers(la))
    strongest = int(la.heads[:, 0].abs().sum((1, 2)).argmax())
    items.append(views.logit_layers(la, layer=strongest))
    items.append(
        plots.figure_block(
            plots.logit_layers(la),
            title="Direct effects: layer × source",
            caption="each edge's write read by the target's logit through every later norm, "
            "frozen at its real scale; red raises the logit, blue lowers it",
        )
    )
    return items


def _methods(model: Any, tokens: torch.Tensor, maps: MixingMaps, progress: bool) -> list[Item]:
    """Where the last token reads from by each method across all layers
    (methods.md#the-peers-methods)."""
    items: list[Item] = [Block('<h2 id="methods">Methods compared</h2>')]
    n = int(maps.mask[0].sum())
    if n > MATRIX_MAX_TOKENS:
        items.append(
            Block(
                f'<p class="tlnm-left-out">{n} tokens: the methods are compared up to '
                f"{MATRIX_MAX_TOKENS} tokens (value zeroing and the whole-model decomposition "
                "grow as n²·d).</p>"
            )
        )
        return items
    layout = adapt(model).layout
    scopes = ["attn_w", "alti", "layer_n"]
    if SCOPES["globenc_n"].refusal(layout) is None:
        scopes.append("globenc_n")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook_filter(model, scopes))
    every = mixing_maps(model, cache, scopes, tokens=tokens)
    columns: dict[str, torch.Tensor] = {"attention rollout": rollout(every, "attn_w")[-1]}
    if "globenc_n" in scopes:
        columns["GlobEnc"] = rollout(every, "globenc_n")[-1]
    columns["ALTI"] = rollout(every, "alti")[-1]
    notes = []
    try:
        columns["value zeroing (rollout)"] = rollout(
            value_zeroing(model, tokens, progress=progress), "vz"
        )[-1]
    except UnsupportedModelError as err:
        notes.append(f"value zeroing: {err}")
    columns["layer_n (last layer)"] = every["layer_n"][-1]
    try:
        columns["decompose_model (last layer)"] = decompose_model(
            model, cache, progress=progress
        ).maps[-1]
    except UnsupportedModelError as err:
        notes.append(f"decompose_model: {err}")
    items.append(views.methods(columns, every))
    items.append(views.routes(every))
    caption = (
        "Rollouts chain each method's per-layer maps from the input tokens to the last layer "
        "(attention rollout: +I and row-normalised; GlobEnc, ALTI, value zeroing: plain "
        "products); layer_n is the last block alone; decompose_model carries each input "
        "token's vectors through every block (exact). Each row is shown as shares of its sum."
    )
    items.append(Block(f'<p class="tlnm-caption">{html.escape(caption)}</p>'))
    items.extend(Block(f'<p class="tlnm-left-out">{html.escape(note)}</p>') for note in notes)
    return items


def _layer(maps: MixingMaps, layer: int) -> list[Item]:
    items: list[Item] = [Block(f'<h2 id="layer-{layer}">Layer {layer}</h2>')]
    n = int(maps.mask[0].sum())
    if n <= MATRIX_MAX_TOKENS:
        items.append(views.compare(maps, layer))
    if n <= HEADS_MAX_TOKENS:
        items.extend(views.heads(maps, scope, layer) for scope in maps.heads)
    if n > HEADS_MAX_TOKENS:
        left_out = "the per-head maps" + (" and the scope maps" if n > MATRIX_MAX_TOKENS else "")
        items.append(
            Block(
                f'<p class="tlnm-left-out">{n} tokens: {left_out} are left out of this report '
                f"(they grow as n² per layer; shown up to {HEADS_MAX_TOKENS} tokens per head, "
                f"{MATRIX_MAX_TOKENS} per scope). Render them in a notebook with "
                "nm.views.heads / nm.views.compare, or report a shorter text.</p>"
            )
        )
    items.append(views.value_norms(maps, layer))
    last = maps.scopes[-1]
    items.append(views.reads_from(maps, last, layer, -1))
    items.append(views.writes_to(maps, last, layer, _first_real(maps)))
    return items


def _layer_statistics(maps: MixingMaps, layer: int) -> list[Item]:
    """A long text's layer: value norms and the last token's strongest sources per scope."""
    n = int(maps.mask[0].sum())
    items: list[Item] = [
        Block(f'<h2 id="layer-{layer}">Layer {layer}</h2>'),
        Block(
            f'<p class="tlnm-left-out">{n} tokens: the maps (n² per layer) are not kept; this '
            "layer shows statistics computed during the forward pass (nm.run_mixing_maps(..., "
            "keep='stats')).</p>"
        ),
        views.value_norms(maps, layer),
    ]
    index = maps.layer_index(layer)
    last = int(maps.mask[0].nonzero()[-1])
    labels = maps.str_tokens[0] if maps.str_tokens else [str(j) for j in range(n)]
    rows = ""
    for scope, stats in maps.stats.items():
        values = stats.top_values[index, 0, last]
        total = float(stats.row_sum[index, 0, last])
        cells = [
            f"{html.escape(repr(labels[int(j)]))}@{int(j)}: {float(v) / total:.3f}"
            for v, j in zip(values, stats.top_indices[index, 0, last], strict=True)
            if int(j) >= 0
        ][:8]
        listed = ", ".join(cells)
        rows += f"<tr><th>{html.escape(scope)}</th><td style='text-align:left'>{listed}</td></tr>"
    items.append(
        Block(
            f"<h3>The last token's strongest sources (share of its row)</h3>"
            f'<table class="tlnm-top-sources">{rows}</table>'
        )
    )
    return items


def _first_real(maps: MixingMaps) -> int:
    return int(maps.mask[0].nonzero()[0])


def _header(model: Any, maps: MixingMaps, seconds: float) -> str:
    spec = adapt(model).spec
    n = int(maps.mask[0].sum())
    rows = [
        ("model", f"{spec.model_name} ({spec.architecture}, {spec.block.layout.name} blocks)"),
        ("TransformerLens", spec.tl_version),
        ("tl_normmix", importlib.metadata.version("tl_normmix")),
        ("weight convention", _CONVENTIONS.get(maps.convention, maps.convention)),
        ("tokens", str(n)),
        ("layers", ", ".join(map(str, maps.layers))),
        ("scopes", ", ".join(maps.scopes)),
        ("feed-forward", _feed_forward(spec)),
        ("self-check", _self_check(maps)),
        ("computed in", f"{seconds:.1f} s"),
    ]
    table = "".join(
        f"<tr><th>{html.escape(k)}</th><td style='text-align:left'>{html.escape(v)}</td></tr>"
        for k, v in rows
    )
    # Tokens are shown one space apart; a token's own leading space (a word start) is not doubled.
    tokens = (
        " ".join(t[1:] if t.startswith(" ") else t for t in maps.str_tokens[0])
        if maps.str_tokens
        else ""
    )
    return (
        f'<table class="tlnm-header">{table}</table>'
        f'<h3>Text</h3><div class="tlnm-text">{html.escape(tokens)}</div>'
        f"{_completeness(maps)}"
    )


def _feed_forward(spec: Any) -> str:
    kind = spec.block.mlp_kind
    if kind is None:
        return "none (attention-only blocks)"
    if kind == "module":
        return (
            "split by Gauss–Legendre quadrature of forward-mode derivatives of the model's own "
            "module (mixture of experts or no closed form), the path cut where a router read off "
            "the module switches experts; completeness residuals above 1e-4 mark receivers whose "
            "block is not smooth along the path (a router that could not be read)"
        )
    return f"{kind} MLP, activation {spec.activation} (found on the model, checked on the run)"


def _self_check(maps: MixingMaps) -> str:
    if not maps.verification:
        return "skipped (verify=False)"
    worst = max((max(r.values(), default=0.0) for r in maps.verification.values()), default=0.0)
    count = sum(len(r) for r in maps.verification.values())
    return f"{count} identities checked on this run; worst relative error {worst:.1e}"


def _completeness(maps: MixingMaps) -> str:
    """Worst relative residual ``‖Σ parts + bias − cached output‖ / ‖output‖`` per layer."""
    if not maps.completeness:
        return (
            "<h3>Completeness</h3><p>No whole-layer scope computed: "
            "no completeness residual to show.</p>"
        )
    head = "".join(f"<th>L{layer}</th>" for layer in maps.layers)
    body = ""
    for scope, residual in maps.completeness.items():
        worst = residual.nan_to_num(0.0).flatten(1).amax(-1)
        cells = "".join(f"<td>{float(x):.1e}</td>" for x in worst)
        body += f"<tr><th>{html.escape(scope)}</th>{cells}</tr>"
    return (
        "<h3>Completeness residuals</h3>"
        '<div class="tlnm-caption">worst token per layer of ‖Σ_j parts + bias terms − cached '
        "output‖ / ‖cached output‖</div>"
        f'<table class="tlnm-completeness"><tr><th>scope</th>{head}</tr>{body}</table>'
    )
