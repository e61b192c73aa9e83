"""Whole-layer tables on a real model over UD English-EWT dev sentences
(methods.md#the-feed-forward-block).

For each sentence (the ``# text =`` lines of EWT dev, read from ``../shared/data/ud``) the model
runs once with only the hooks the whole-layer scopes need; then, per layer:

* contextualization change (``1 − Spearman ρ`` over the valid cells of each sentence, averaged
  over sentences) caused by each step after the attention block: FF (``attnresln_n`` →
  ``attnreslnff_n``), RES2 (→ ``attnreslnffres_n``) and, in post-LN blocks, LN2
  (→ ``attnreslnffresln_n``); and the net change of the whole FF sub-block (``attnresln_n`` → the
  block output);
* mixing ratios of the FF and block-output maps and the worst completeness residual;
* the pairs ``(i ← j)`` whose share the FF amplifies most, over the whole corpus, in the layers
  given by ``--pair-layers`` (default: an early and a middle layer).

Run (MiniLM about 1 minute, SmolLM2 about 5 minutes on 2 CPU cores)::

    .venv/bin/python scripts/whole_layer_tables.py --model all-MiniLM-L6-v2 --sentences 200
    .venv/bin/python scripts/whole_layer_tables.py --model SmolLM2-135M --sentences 200
"""

from __future__ import annotations

import argparse
import heapq
from pathlib import Path

import torch
from tqdm import tqdm

import tl_normmix as nm
from tl_normmix.corpus import conllu_texts

EWT_DEV = Path(__file__).resolve().parents[2] / "shared/data/ud/UD_English-EWT/en_ewt-ud-dev.conllu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--conllu", type=Path, default=EWT_DEV)
    parser.add_argument("--pair-layers", type=int, nargs="*", default=None)
    parser.add_argument("--pairs", type=int, default=10, help="pairs per listed layer")
    parser.add_argument(
        "--exclude-first", action="store_true", help="leave the first token out as a source"
    )
    args = parser.parse_args()
    model = nm.load_model(args.model)
    spec = nm.adapt(model).spec
    post_ln = spec.block.kind.value == "post_ln"
    scopes = ["attnresln_n", "attnreslnff_n", "attnreslnffres_n"]
    scopes += ["attnreslnffresln_n"] if post_ln else []
    output = scopes[-1]
    steps = {"FF": (scopes[0], scopes[1]), "RES2": (scopes[1], scopes[2])}
    if post_ln:
        steps["LN2"] = (scopes[2], scopes[3])
    steps["net (FF+RES2" + ("+LN2)" if post_ln else ")")] = (scopes[0], output)
    pair_layers = args.pair_layers
    if pair_layers is None:
        pair_layers = [1, spec.n_layers // 2]
    names = nm.hook_filter(model, scopes)

    changes: dict[str, list[torch.Tensor]] = {step: [] for step in steps}
    ratio_sum = {s: torch.zeros(spec.n_layers, dtype=torch.float64) for s in scopes}
    worst = {s: torch.zeros(spec.n_layers) for s in scopes[1:]}
    tokens_seen = 0
    heaps: dict[int, list[tuple[float, int, str, str, float, float]]] = {
        layer: [] for layer in pair_layers
    }
    texts = conllu_texts(args.conllu, args.sentences)
    for index, text in enumerate(tqdm(texts, desc=args.model)):
        toks = model.to_tokens(text)
        with torch.no_grad():
            _, cache = model.run_with_cache(toks, names_filter=names)
        maps = nm.mixing_maps(model, cache, scopes, tokens=toks)
        for step, (before, after) in steps.items():
            changes[step].append(nm.contextualization_change(maps, before, after)[:, 0])
        n = int(maps.mask.sum())
        tokens_seen += n
        for s in scopes:
            ratio_sum[s] += maps.mixing_ratio(s)[:, 0].double().nansum(-1)
        for s, residual in maps.completeness.items():
            worst[s] = torch.maximum(worst[s], residual.nan_to_num(0.0).amax((1, 2)))
        exclude = (0,) if args.exclude_first else ()
        for layer, pairs in nm.ff_amplified_pairs(maps, k=args.pairs, exclude_keys=exclude).items():
            if layer not in heaps:
                continue
            for p in pairs:
                item = (p.gain, index, p.query_token, p.key_token, p.share_before, p.share_after)
                if len(heaps[layer]) < args.pairs:
                    heapq.heappush(heaps[layer], item)
                else:
                    heapq.heappushpop(heaps[layer], item)

    print(f"\n{spec.model_name}: {len(texts)} EWT dev sentences, {tokens_seen} tokens")
    print("\nContextualization change (1 − Spearman ρ), mean over sentences, per layer\n")
    print("| layer | " + " | ".join(steps) + " |")
    print("|---" * (len(steps) + 1) + "|")
    stacked = {step: torch.stack(values).nanmean(0) for step, values in changes.items()}
    for layer in range(spec.n_layers):
        cells = [f"{float(stacked[step][layer]):.3f}" for step in steps]
        print(f"| {layer} | " + " | ".join(cells) + " |")
    print("| mean | " + " | ".join(f"{float(v.mean()):.3f}" for v in stacked.values()) + " |")
    print("\nMixing ratio (mean over tokens) and worst completeness residual, per layer\n")
    print(
        "| layer | "
        + " | ".join(f"r {s}" for s in scopes)
        + " | "
        + " | ".join(f"resid {s}" for s in worst)
        + " |"
    )
    print("|---" * (1 + len(scopes) + len(worst)) + "|")
    for layer in range(spec.n_layers):
        ratios = [f"{float(ratio_sum[s][layer]) / tokens_seen:.3f}" for s in scopes]
        residuals = [f"{float(worst[s][layer]):.1e}" for s in worst]
        print(f"| {layer} | " + " | ".join(ratios + residuals) + " |")
    where = " (first token excluded as a source)" if args.exclude_first else ""
    print(f"\nPairs whose share the FF amplifies most (i ← j), over the corpus{where}\n")
    print("| layer | sentence | receiver i | source j | share before FF | after FF |")
    print("|---|---|---|---|---|---|")
    for layer, heap in heaps.items():
        for gain, index, query, key, before, after in sorted(heap, reverse=True):
            del gain
            print(f"| {layer} | {index} | {query!r} | {key!r} | {before:.3f} | {after:.3f} |")


if __name__ == "__main__":
    main()
