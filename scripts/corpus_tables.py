"""The results page's corpus tables: Clark et al. 2019 on MiniLM, Vig & Belinkov 2019 on SmolLM2,
weights against norms, over EWT dev + test (``../shared/data/ud``), under a word policy
(``--tokenization text|words``, ``--alignment strict|shared``).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/corpus_tables.py --model all-MiniLM-L6-v2 \\
        --out runs/minilm-ewt
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/corpus_tables.py --model SmolLM2-135M \\
        --out runs/smollm2-ewt

Runs (or resumes) ``nm.corpus.analyse`` with the scopes ``attn_w,attn_n`` and prints markdown:
the best-head table of each scope, the special-token / first-token share per layer by weight and
by norm, the V&B layer profiles, the POS each layer attends to most, and two exemplar sentences.
``--report FILE`` also writes the run's HTML page.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

import tl_normmix as nm

UD = Path(__file__).resolve().parents[2] / "shared" / "data" / "ud"
EWT = [UD / "UD_English-EWT" / f"en_ewt-ud-{split}.conllu" for split in ("dev", "test")]
SCOPES = ("attn_w", "attn_n")


def markdown(frame: pd.DataFrame, digits: int = 2) -> str:
    head = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = [
        "| "
        + " | ".join(f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in record)
        + " |"
        for record in frame.itertuples(index=False)
    ]
    return "\n".join([head, rule, *rows])


def best_heads(res: nm.corpus.CorpusResult, scope: str, n: int = 12) -> str:
    table = res.best_heads(scope).head(n).copy()
    table["head"] = [f"{r.layer}-{r['head']} {r.direction}" for _, r in table.iterrows()]
    table = table[["relation", "count", "head", "accuracy", "offset", "offset_accuracy", "gain"]]
    return markdown(table.rename(columns={"head": "best layer-head direction"}))


def per_layer(res: nm.corpus.CorpusResult, kinds: list[str]) -> str:
    rows = []
    for scope in SCOPES:
        share = res.special_share(scope)
        share = share[share["head"] == -1]
        for kind in kinds:
            s = share[share.kind == kind].set_index("layer").share
            if s.empty:
                continue  # e.g. no [CLS] in a decoder, no "first" kind in an encoder
            rows.append({"scope": scope, "kind": kind, **{str(k): v for k, v in s.items()}})
    return markdown(pd.DataFrame(rows))


def profiles(res: nm.corpus.CorpusResult) -> str:
    rows = []
    for scope in SCOPES:
        dep = res.dependency_alignment(scope)
        dep = dep[(dep["head"] == -1) & (dep.variant == "either")].set_index("layer").share
        dist = res.distance(scope)
        dist = dist[dist["head"] == -1].set_index("layer").value
        ent = res.entropy(scope)
        ent = ent[ent["head"] == -1].set_index("layer").value
        first = res.special_share(scope)
        first = first[first["head"] == -1]
        kind = "first" if (first.kind == "first").any() else "cls"
        first = first[first.kind == kind].set_index("layer").share
        pos = res.pos_share(scope)
        pos = pos[pos["head"] == -1]
        top = pos.sort_values("share", ascending=False).groupby("layer").head(1).set_index("layer")
        for layer in dep.index:
            rows.append(
                {
                    "scope": scope,
                    "layer": layer,
                    "dep. alignment": dep[layer],
                    "distance": dist[layer],
                    "entropy": ent[layer],
                    "first-token / [CLS] share": first[layer],
                    "top POS": f"{top.upos[layer]} {top.share[layer]:.2f}",
                }
            )
    return markdown(pd.DataFrame(rows))


def exemplars(res: nm.corpus.CorpusResult, n: int = 2) -> str:
    lines = []
    for scope in SCOPES:
        dep = res.dependency_alignment(scope)
        dep = dep[(dep.variant == "either") & (dep["head"] >= 0)]
        best = dep.sort_values("share", ascending=False).iloc[0]
        layer, head = int(best.layer), int(best["head"])
        lines.append(f"{scope}, head {layer}-{head} (dependency alignment {best.share:.2f}):")
        for r in res.exemplars(scope, "dependency_alignment", layer, head, k=n).itertuples():
            tokens = list(r.tokens)
            row = list(r.row)
            top = sorted(range(len(row)), key=lambda j: -row[j])[:3]
            reads = ", ".join(f"{tokens[j]!r} {row[j]:.2f}" for j in top)
            lines.append(f"- “{r.text}” — {tokens[r.query]!r} reads from {reads}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-sentences", type=int)
    parser.add_argument("--report")
    parser.add_argument("--restart", action="store_true")
    parser.add_argument("--tokenization", choices=("text", "words"), default="text")
    parser.add_argument("--alignment", choices=("strict", "shared"), default="strict")
    args = parser.parse_args()
    start = time.perf_counter()
    res = nm.corpus.analyse(
        args.model,
        EWT,
        args.out,
        SCOPES,
        nm.corpus.CorpusConfig(
            batch_size=args.batch_size,
            max_sentences=args.max_sentences,
            restart=args.restart,
            tokenization=args.tokenization,
            alignment=args.alignment,
        ),
    )
    assert res is not None
    seconds = time.perf_counter() - start
    counts = ", ".join(f"{r.sentences} {r.status}" for r in res.summary().itertuples())
    policy = f"tokenization={args.tokenization}, alignment={args.alignment}"
    print(f"{args.model} over EWT dev + test ({policy}): {counts}; {seconds:.0f} s\n")
    for scope in SCOPES:
        print(f"Best head per relation, {scope} (Clark Table 1)\n\n{best_heads(res, scope)}\n")
    print("Share per layer (layer maps: head mean for attn_w, sum of heads for attn_n)\n")
    print(per_layer(res, ["cls", "sep", "first", "punct"]) + "\n")
    print(f"Layer profiles (Vig & Belinkov)\n\n{profiles(res)}\n")
    print(f"Exemplars\n\n{exemplars(res)}\n")
    if args.report:
        from tl_normmix.reports.corpus_report import build_corpus_report

        Path(args.report).write_text(build_corpus_report(res))


if __name__ == "__main__":
    main()
