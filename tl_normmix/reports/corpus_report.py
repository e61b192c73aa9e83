"""The offline HTML page of a corpus run (``tl-normmix corpus report``).

Sections: the run (model, corpus, sentences analysed and why others were not, fingerprint); per
statistic a layer × head heat map for each per-head scope, weights and norms side by side
(dependency alignment, attention distance, entropy, share on special tokens, Clark accuracy);
the best-head table of each scope against the positional baseline; layer profiles of every scope
(the layer maps); and exemplar sentences of the heads that align most with dependency arcs,
coloured by the head's row for the query token that shows it most (CircuitsVis tokens).
"""

from __future__ import annotations

import html
from typing import Any

import pandas as pd

from tl_normmix.corpus.results import CorpusResult
from tl_normmix.render import plots
from tl_normmix.render.page import Block, Item, Row, View, page

__all__ = ["build_corpus_report"]


def _table(frame: pd.DataFrame, caption: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for record in frame.itertuples(index=False):
        cells = []
        for value in record:
            text = f"{value:.3f}" if isinstance(value, float) else str(value)
            cells.append(f"<td>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f'<table class="tlnm-corpus">{cap}<tr>{head}</tr>{"".join(rows)}</table>'


def _grids(result: CorpusResult, scopes: list[str]) -> list[Item]:
    """Heat maps, weights and norms side by side, one figure per statistic."""
    from matplotlib.figure import Figure

    def frames(scope: str) -> dict[str, pd.DataFrame]:
        dep = result.dependency_alignment(scope)
        special = result.special_share(scope)
        kind = "cls" if (special.kind == "cls").any() else "first"
        acc = result.relation_accuracy(scope)
        acc = acc[acc.relation == "all"].groupby(["layer", "head"]).accuracy.max().reset_index()
        return {
            "dependency alignment (either direction)": dep[dep.variant == "either"].rename(
                columns={"share": "value"}
            ),
            "mean attention distance (tokens)": result.distance(scope),
            "entropy of the rows (nats)": result.entropy(scope),
            f"share on the {kind} token": special[special.kind == kind].rename(
                columns={"share": "value"}
            ),
            "share on punctuation": special[special.kind == "punct"].rename(
                columns={"share": "value"}
            ),
            "Clark accuracy, all relations (best direction)": acc.rename(
                columns={"accuracy": "value"}
            ),
        }

    per_scope = {scope: frames(scope) for scope in scopes}
    items: list[Item] = []
    for statistic in per_scope[scopes[0]]:
        fig = Figure(figsize=(4.2 * len(scopes), 3.4), layout="constrained")
        panels = [per_scope[scope][statistic] for scope in scopes]
        heads = pd.concat([f[f["head"] >= 0] for f in panels])
        low, high = float(heads.value.min()), float(heads.value.max())
        for i, (scope, frame) in enumerate(zip(scopes, panels, strict=True)):
            ax = fig.add_subplot(1, len(scopes), i + 1)
            plots.head_grid(frame, "value", scope, ax=ax, vmin=low, vmax=high)
        items.append(
            plots.figure_block(fig, title=statistic, caption="one colour scale for all panels")
        )
    return items


def _profiles(result: CorpusResult) -> list[Item]:
    from matplotlib.figure import Figure

    def layer_map(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[frame["head"] == -1]

    fig = Figure(figsize=(12, 6.8), layout="constrained")
    axes = [fig.add_subplot(2, 2, i + 1) for i in range(4)]
    dep, dist, ent, first = [], [], [], []
    for scope in result.scopes:
        d = layer_map(result.dependency_alignment(scope))
        dep.append((scope, d[d.variant == "either"].rename(columns={"share": "value"})))
        dist.append((scope, layer_map(result.distance(scope))))
        ent.append((scope, layer_map(result.entropy(scope))))
        s = layer_map(result.special_share(scope))
        kind = "cls" if (s.kind == "cls").any() else "first"
        first.append((f"{scope} ({kind})", s[s.kind == kind].rename(columns={"share": "value"})))
    plots.layer_profiles(dep, "share", "dependency alignment", ax=axes[0])
    plots.layer_profiles(dist, "tokens", "attention distance", ax=axes[1])
    plots.layer_profiles(ent, "nats", "entropy", ax=axes[2])
    plots.layer_profiles(first, "share", "share on the first / [CLS] token", ax=axes[3])
    return [plots.figure_block(fig, title="Layer profiles (layer maps of every scope)")]


def _exemplars(result: CorpusResult, scopes: list[str], n: int = 2) -> list[Item]:
    items: list[Item] = []
    for scope in scopes:
        dep = result.dependency_alignment(scope)
        dep = dep[(dep.variant == "either") & (dep["head"] >= 0)]
        if dep.empty:
            continue
        best = dep.sort_values("share", ascending=False, kind="mergesort").iloc[0]
        layer, head = int(best.layer), int(best["head"])
        rows = result.exemplars(scope, "dependency_alignment", layer, head, k=n)
        views = []
        for record in rows.itertuples():
            tokens = [str(t) for t in record.tokens]
            values = [float(v) for v in record.row]
            views.append(
                View(
                    "ColoredTokens",
                    {"tokens": tokens, "values": values, "maxValue": max(values), "minValue": 0.0},
                    title=f"sentence {record.sentence_id}: {tokens[record.query]!r} reads from",
                    caption=f"share on dependency arcs {record.score:.2f}",
                )
            )
        items.append(
            Row(
                tuple(views),
                title=f"{scope}: layer {layer}, head {head} — the head most "
                f"aligned with dependency arcs ({best.share:.2f})",
            )
        )
    return items


def build_corpus_report(result: CorpusResult, *, new_id: Any = None) -> str:
    """The page's HTML for a reduced run."""
    fp = result.manifest["fingerprint"]
    summary = result.summary()
    tokens = result.agg[result.agg.stat == "tokens"]["sum"].sum()
    rows = [
        ("model", f"{fp['model']} ({fp['dtype']}, weights sha256 {fp['weights_sha256'][:12]}…)"),
        ("corpus", ", ".join(f"{c['file']} ({c['sentences']} sentences)" for c in fp["corpus"])),
        (
            "sentences",
            ", ".join(f"{r.sentences} {r.status}" for r in summary.itertuples())
            + f"; {int(tokens)} tokens analysed",
        ),
        ("scopes", ", ".join(fp["scopes"])),
        ("alignment policy", fp["alignment_policy"]),
        ("versions", ", ".join(f"{k} {v}" for k, v in fp["versions"].items())),
    ]
    header = "".join(
        f"<tr><th>{html.escape(k)}</th><td style='text-align:left'>{html.escape(v)}</td></tr>"
        for k, v in rows
    )
    header = f'<table class="tlnm-header">{header}</table>'
    per_head = [s for s in result.scopes if (result.distance(s)["head"] >= 0).any()]
    items: list[Item] = []
    if per_head:
        items.append(Block("<h2>Heads: weights and norms side by side</h2>"))
        items.extend(_grids(result, per_head))
    items.append(Block("<h2>Best head per relation (Clark et al. 2019, Table 1)</h2>"))
    for scope in result.scopes:
        best = result.best_heads(scope).head(20)
        items.append(
            Block(
                _table(best),
                title=scope,
                caption="accuracy of the best (layer, head, direction) against the "
                "best fixed offset; gain = accuracy − offset accuracy",
            )
        )
    items.extend(_profiles(result))
    if per_head:
        items.append(Block("<h2>Exemplar sentences (Vig & Belinkov 2019, §6)</h2>"))
        items.extend(_exemplars(result, per_head))
    failures = result.failures()
    if not failures.empty:  # the reason without its "path:line: " prefix (both are columns)
        failures = failures.assign(reason=[r.split(": ", 1)[-1] for r in failures.reason])
        items.append(
            Block(
                _table(failures.head(20)),
                title=f"Sentences not analysed in full ({len(failures)}; the first 20)",
                caption="res.failures() lists them all",
            )
        )
    return page(items, title=f"tl_normmix corpus — {fp['model']}", header=header, new_id=new_id)
