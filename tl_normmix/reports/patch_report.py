"""The offline HTML page of ``tl-normmix patch``: maps beside exact interventions for one text.

For the last token as receiver, every (layer, source) edge is removed alone (``nm.knock_out``,
all heads together) and the effect on a metric is measured: for a
causal LM the log-probability of the model's own top-1 next token; for an encoder (no trained
head assumed) the share of the clean sentence embedding kept, ``⟨h̄, c̄⟩ / ‖c̄‖²`` with ``h̄`` the
mean-pooled final hidden states of the run and ``c̄`` those of the clean run (1 on the clean run).
A distance or cosine similarity to the clean embedding would be at its extremum on the clean run:
its gradient there is zero, and with it every first-order attribution.
The page holds a header (model, metric, edges, forwards, time), the agreement of each scope and
of the first-order attribution with the effects (table and plot), the faithfulness curves of the
edges each scoring keeps, and per layer the exact effects beside each map's row.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tl_normmix.interventions.agreement import agreement
from tl_normmix.interventions.attribution import edge_attribution
from tl_normmix.interventions.circuits import faithfulness_curve
from tl_normmix.interventions.edges import edges
from tl_normmix.interventions.knockout import knock_out
from tl_normmix.maps import hook_filter, mixing_maps
from tl_normmix.models.adapter import adapt
from tl_normmix.models.editing import editor, on_hidden_states
from tl_normmix.render import plots, views
from tl_normmix.render.page import Block, Item, page

__all__ = ["build_patch_report", "default_metric"]

FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def default_metric(model: Any, tokens: torch.Tensor) -> tuple[Callable[..., Any], str]:
    """The metric of the page and its description (see the module docstring)."""
    ed = editor(model)
    if adapt(model).spec.causal:
        with torch.no_grad():
            logits = ed.run(tokens)
        top = int(logits[0, -1].argmax())
        word = model.tokenizer.decode(top) if getattr(model, "tokenizer", None) else str(top)

        def log_prob(logits: torch.Tensor) -> torch.Tensor:
            return logits[:, -1].log_softmax(-1)[:, top]

        return log_prob, f"log p({word!r}) after the text (the model's top-1 next token)"
    with torch.no_grad():
        clean = ed.run(tokens, hidden=True).mean(1)

    @on_hidden_states
    def kept(hidden: torch.Tensor) -> torch.Tensor:
        return (hidden.mean(1) * clean).sum(-1) / (clean * clean).sum(-1)

    return kept, (
        "share of the clean sentence embedding kept: ⟨h̄, c̄⟩ / ‖c̄‖², h̄ the mean-pooled final "
        "hidden states, c̄ those of the clean run"
    )


def build_patch_report(
    model: Any,
    tokens: torch.Tensor,
    *,
    scopes: Sequence[str] = ("attn_w", "attn_n", "attnres_n"),
    new_id: Callable[[], str] | None = None,
    progress: bool = False,
) -> str:
    """The page's HTML for ``tokens`` (``[1, pos]``) on ``model`` (``progress``: bars over the
    knock-outs and the attribution)."""
    start = time.perf_counter()
    metric, description = default_metric(model, tokens)
    names = hook_filter(model, scopes)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    maps = mixing_maps(model, cache, scopes, tokens=tokens)
    del cache
    ko = knock_out(model, tokens, edges(heads=None), metric, progress=progress)
    att = edge_attribution(model, tokens, metric, progress=progress)
    report = agreement([maps, att.as_maps()], ko, k=5)
    curves = [
        (scope, faithfulness_curve(model, tokens, metric, maps[scope], FRACTIONS, progress=False))
        for scope in scopes
    ]
    by_attribution = faithfulness_curve(model, tokens, metric, att.maps.abs(), progress=False)
    curves.append(("attribution", by_attribution))
    effects = ko.as_maps()
    seconds = time.perf_counter() - start
    spec = adapt(model).spec
    rows = [
        ("model", f"{spec.model_name} ({spec.block.layout.name} blocks)"),
        ("metric", description),
        (
            "intervention",
            f"'{ko.mode}' of each (layer, source) edge into the last token, all "
            "heads together, alone; exact",
        ),
        ("edges / forwards", f"{len(ko.edges)} / {ko.n_forwards}"),
        ("weight convention", ko.convention),
        ("computed in", f"{seconds:.1f} s"),
    ]
    table = "".join(
        f"<tr><th>{html.escape(k)}</th><td style='text-align:left'>{html.escape(v)}</td></tr>"
        for k, v in rows
    )
    overall = report.table[report.table.layer == "all"]
    agreement_rows = "".join(
        f"<tr><th>{html.escape(str(r.scope))}</th><td>{r.spearman:.2f}</td>"
        f"<td>{r.recall_at_k:.2f}</td><td>{r.edges}</td></tr>"
        for r in overall.itertuples()
    )
    header = (
        f'<table class="tlnm-header">{table}</table>'
        "<h3>Agreement with the exact effects</h3>"
        '<table class="tlnm-agreement"><tr><th>scoring</th><th>Spearman ρ with |effect|</th>'
        f"<th>top-5 recall</th><th>edges</th></tr>{agreement_rows}</table>"
    )
    items: list[Item] = [
        plots.figure_block(
            plots.agreement(report),
            title="Agreement per layer",
            caption="Spearman ρ between each map's cell and the exact effect of removing it",
        ),
        plots.figure_block(
            plots.faithfulness(curves),
            title="Faithfulness of the edges each scoring keeps",
            caption="every edge outside the top fraction removed, in one forward: share of the "
            "clean − all-removed gap recovered",
        ),
    ]
    for layer in maps.layers:
        items.append(Block(f'<h2 id="layer-{layer}">Layer {layer}</h2>'))
        items.append(views.effects(effects, maps, layer, scopes=scopes))
    return page(items, title=f"tl_normmix patch — {spec.model_name}", header=header, new_id=new_id)
