"""Maps against exact interventions on the packaged real models.

SmolLM2-135M (``--model SmolLM2-135M``): for each prompt of ``scripts/data/patching_prompts.txt``
(factual recall, IOI-style, subject–verb agreement), the metric is the log-probability of the
model's own top-1 next token; the receiver is the last token. Exact ``remove`` effects of every
(layer, source) edge — all heads together and per head — then ``nm.agreement`` of ``attn_w``,
``attn_n``, ``attnres_n``, ``attnresln_n``, ``layer_n`` and ``edge_attribution``, and faithfulness
curves of the edges (all receivers) each scoring keeps.

all-MiniLM-L6-v2 (``--model all-MiniLM-L6-v2``): the first EWT dev sentences; the metric reads the
final hidden states (``nm.on_hidden_states``): the share of the clean sentence embedding (the
model's own mean pooling) kept, ``⟨h̄, c̄⟩ / ‖c̄‖²`` (``tl-normmix patch``'s metric; a cosine to the
clean embedding has zero gradient on the clean run, so no first-order attribution); every
(layer, receiver, source) edge, all heads together.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/patching_tables.py --model SmolLM2-135M
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/patching_tables.py --model all-MiniLM-L6-v2 \\
        --sentences 20

Prints markdown tables; ``--json FILE`` keeps every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import tl_normmix as nm
from tl_normmix.corpus import conllu_texts
from tl_normmix.reports.patch_report import default_metric

ROOT = Path(__file__).resolve().parent
PROMPTS = ROOT / "data" / "patching_prompts.txt"
EWT_DEV = ROOT.parents[1] / "shared" / "data" / "ud" / "UD_English-EWT" / "en_ewt-ud-dev.conllu"
SCOPES = ("attn_w", "attn_n", "attnres_n", "attnresln_n", "layer_n")
FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def read_prompts(path: Path) -> list[tuple[str, str]]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            kind, text = line.split("\t", 1)
            out.append((kind, text))
    return out


def maps_of(model, toks: torch.Tensor, scopes=SCOPES) -> nm.MixingMaps:
    names = nm.hook_filter(model, scopes)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=names)
    return nm.mixing_maps(model, cache, scopes, tokens=toks)


def overall(report: nm.Agreement) -> dict[str, tuple[float, float]]:
    table = report.table
    rows = table[table.layer == "all"]
    return {r.scope: (float(r.spearman), float(r.recall_at_k)) for r in rows.itertuples()}


def causal_study(model, prompts: list[tuple[str, str]], k: int) -> dict:
    results = []
    for kind, text in tqdm(prompts, desc="prompts"):
        toks = model.to_tokens(text)
        with torch.no_grad():
            logits = model(toks)
        top = int(logits[0, -1].argmax())

        def metric(logits, top=top):
            return logits[:, -1].log_softmax(-1)[:, top]

        start = time.perf_counter()
        maps = maps_of(model, toks)
        att = nm.edge_attribution(model, toks, metric)
        ko_all = nm.knock_out(model, toks, nm.edges(heads=None), metric)
        ko_head = nm.knock_out(model, toks, nm.edges(heads="each"), metric)
        # signed direct effects on the top token's logit, and ALTI-Logit (the rows tracked)
        logit = nm.logit_attribution(model, target=top, tokens=toks).as_maps(tracked="alti")
        both = [maps, att.as_maps(), logit]
        curves = {}
        for scope in (*SCOPES, "attribution"):
            scores = att.maps.abs() if scope == "attribution" else maps[scope]
            curve = nm.faithfulness_curve(model, toks, metric, scores, FRACTIONS)
            curves[scope] = curve.recovered[:, 0].tolist()
        sink_weight = float(maps["attn_w"][:, 0, -1, 0].mean())
        results.append(
            {
                "kind": kind,
                "text": text,
                "tokens": toks.shape[1],
                "top": model.tokenizer.decode(top),
                "p": float(logits[0, -1].softmax(-1)[top]),
                "all_heads": overall(nm.agreement(both, ko_all, k=k)),
                "per_head": overall(
                    nm.agreement(
                        both, ko_head, scopes=["attn_w", "attn_n", "attribution", "logit"], k=k
                    )
                ),
                "curves": curves,
                "forwards": ko_all.n_forwards + ko_head.n_forwards,
                "edges": len(ko_all.edges) + len(ko_head.edges),
                "seconds": time.perf_counter() - start,
                "sink_weight_last_token": sink_weight,
                "effect_first_token": float(
                    ko_all.effect[[e.source == 0 for e in ko_all.edges]].abs().mean()
                ),
                "effect_others": float(
                    ko_all.effect[[e.source != 0 for e in ko_all.edges]].abs().nanmean()
                ),
            }
        )
    return {"prompts": results}


def encoder_study(model, sentences: list[str], k: int) -> dict:
    results = []
    for text in tqdm(sentences, desc="sentences"):
        toks = model.to_tokens(text)
        metric, _ = default_metric(model, toks)
        maps = maps_of(model, toks, (*SCOPES, "attnreslnffresln_n"))
        att = nm.edge_attribution(model, toks, metric)
        ko = nm.knock_out(model, toks, nm.edges(heads=None, receivers=None), metric)
        results.append(
            {
                "text": text,
                "tokens": toks.shape[1],
                "all_heads": overall(nm.agreement([maps, att.as_maps()], ko, k=k)),
                "forwards": ko.n_forwards,
                "edges": len(ko.edges),
            }
        )
    return {"sentences": results}


def summarise(results: list[dict], key: str) -> list[tuple[str, float, float, float, float]]:
    scopes = list(results[0][key])
    rows = []
    for scope in scopes:
        rho = [r[key][scope][0] for r in results]
        recall = [r[key][scope][1] for r in results]
        rows.append((scope, statistics.mean(rho), min(rho), max(rho), statistics.mean(recall)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M")
    parser.add_argument("--sentences", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=None, help="first N prompts only")
    parser.add_argument("--k", type=int, default=5, help="top-k recall")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = nm.load_model(args.model)
    spec = nm.adapt(model).spec
    print(
        f"{spec.model_name}: {spec.n_layers} layers, {spec.block.n_heads} heads, "
        f"{spec.block.layout.name} blocks, torch {torch.__version__}",
        file=sys.stderr,
    )
    if spec.causal:
        prompts = read_prompts(PROMPTS)[: args.prompts]
        data = causal_study(model, prompts, args.k)
        rows = data["prompts"]
        print(
            f"\n{len(rows)} prompts, receiver = last token, metric = log p(top-1); exact "
            f"'remove' effects of every (layer, source) edge; {sum(r['edges'] for r in rows)} "
            f"edges in {sum(r['forwards'] for r in rows)} forwards, "
            f"{sum(r['seconds'] for r in rows):.0f} s\n"
        )
        for key, title in (("all_heads", "all heads together"), ("per_head", "per head")):
            print(
                f"| scope ({title}) | Spearman ρ with abs(effect), mean [min, max] | "
                f"top-{args.k} recall |"
            )
            print("|---|---|---|")
            for scope, mean, low, high, recall in summarise(rows, key):
                print(f"| {scope} | {mean:.2f} [{low:.2f}, {high:.2f}] | {recall:.2f} |")
            print()
        print("| fraction of edges kept | " + " | ".join(f"{f:g}" for f in FRACTIONS) + " |")
        print("|---|" + "---|" * len(FRACTIONS))
        for scope in (*SCOPES, "attribution"):
            curve = torch.tensor([r["curves"][scope] for r in rows]).nanmean(0)
            print(f"| {scope} | " + " | ".join(f"{v:.2f}" for v in curve.tolist()) + " |")
        print()
        sink = statistics.mean(r["sink_weight_last_token"] for r in rows)
        first = statistics.mean(r["effect_first_token"] for r in rows)
        others = statistics.mean(r["effect_others"] for r in rows)
        print(
            f"first token: mean head-mean weight from the last token {sink:.2f}; mean "
            f"abs(effect) of removing its edges {first:.3f} vs {others:.3f} for other sources"
        )
    else:
        sentences = conllu_texts(EWT_DEV, args.sentences)
        data = encoder_study(model, sentences, args.k)
        rows = data["sentences"]
        print(
            f"\n{len(rows)} EWT dev sentences, metric = share of the clean sentence "
            "embedding kept (mean-pooled final hidden states); every (layer, receiver, source) "
            f"edge, all heads together; {sum(r['edges'] for r in rows)} edges in "
            f"{sum(r['forwards'] for r in rows)} forwards\n"
        )
        print(f"| scope | Spearman ρ with abs(effect), mean [min, max] | top-{args.k} recall |")
        print("|---|---|---|")
        for scope, mean, low, high, recall in summarise(rows, "all_heads"):
            print(f"| {scope} | {mean:.2f} [{low:.2f}, {high:.2f}] | {recall:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
