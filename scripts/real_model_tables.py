"""Mixing-ratio and sink tables on a real model over UD English-EWT dev sentences.

For each sentence (the ``# text =`` lines of EWT dev, read from ``../shared/data/ud``) the
model runs once with only the hooks the five attention-block scopes need; then, per layer:

* the mixing ratio of every scope (methods.md#residual-and-layer-norm), mean / max / min over all
real tokens;
* the share of attention weight (``attn_w``) and of norm-based attention (``attn_n``) received by
  the sink token (position 0: [CLS] for BERT, the first token for SmolLM2), averaged over queries.

Run (about 1 minute per model on 2 CPU cores)::

    .venv/bin/python scripts/real_model_tables.py --model all-MiniLM-L6-v2 --sentences 200
    .venv/bin/python scripts/real_model_tables.py --model SmolLM2-135M --sentences 200
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

import tl_normmix as nm
from tl_normmix.analysis.summary import mixing_ratio_stats, sink_share
from tl_normmix.corpus import conllu_texts

SCOPES = ("attn_w", "attn_n", "attnres_w", "attnres_n", "attnresln_n")
EWT_DEV = Path(__file__).resolve().parents[2] / "shared/data/ud/UD_English-EWT/en_ewt-ud-dev.conllu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--conllu", type=Path, default=EWT_DEV)
    args = parser.parse_args()
    model = nm.load_model(args.model)
    names = nm.hook_filter(model, SCOPES)
    sums: dict[str, torch.Tensor] = {}
    highs: dict[str, torch.Tensor] = {}
    lows: dict[str, torch.Tensor] = {}
    tokens_seen = 0
    shares = {"attn_w": [], "attn_n": []}
    for text in tqdm(conllu_texts(args.conllu, args.sentences), desc=args.model):
        toks = model.to_tokens(text)
        with torch.no_grad():
            _, cache = model.run_with_cache(toks, names_filter=names)
        maps = nm.mixing_maps(model, cache, SCOPES)
        n = int(maps.mask.sum())
        tokens_seen += n
        for scope in SCOPES:
            stats = mixing_ratio_stats(maps, scope)
            sums[scope] = sums.get(scope, 0) + stats[:, 0] * n
            highs[scope] = torch.maximum(highs.get(scope, stats[:, 1]), stats[:, 1])
            lows[scope] = torch.minimum(lows.get(scope, stats[:, 2]), stats[:, 2])
        for scope in shares:
            shares[scope].append(sink_share(maps, scope))
    spec = nm.adapt(model).spec
    print(f"\n{spec.model_name}: {args.sentences} EWT dev sentences, {tokens_seen} tokens")
    print("\nMixing ratio, mean over all tokens [max, min], per layer and scope\n")
    print("| layer | " + " | ".join(SCOPES) + " |")
    print("|---" * (len(SCOPES) + 1) + "|")
    for layer in range(spec.n_layers):
        cells = [
            f"{float(sums[s][layer]) / tokens_seen:.3f} [{float(highs[s][layer]):.2f}, "
            f"{float(lows[s][layer]):.2f}]"
            for s in SCOPES
        ]
        print(f"| {layer} | " + " | ".join(cells) + " |")
    overall = [f"{float(sums[s].sum()) / (tokens_seen * spec.n_layers):.3f}" for s in SCOPES]
    print("| all | " + " | ".join(overall) + " |")
    weight = torch.stack(shares["attn_w"]).mean(0)
    norm = torch.stack(shares["attn_n"]).mean(0)
    print("\nShare received by the sink (position 0), mean over queries and sentences\n")
    print("| layer | by weight (attn_w) | by norm (attn_n) | norm / weight |")
    print("|---|---|---|---|")
    for layer in range(spec.n_layers):
        ratio = float(norm[layer] / weight[layer])
        print(f"| {layer} | {float(weight[layer]):.3f} | {float(norm[layer]):.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
