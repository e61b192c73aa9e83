"""Benchmark: corpus throughput, and the analyses' cost over ``run_with_cache`` alone.

For a model and EWT dev + test (or the first ``--sentences``), in one process:

* **forward only**: the same padded batches ``nm.corpus`` builds, through
  ``model.run_with_cache(tokens, names_filter=hook_filter(model, scopes))`` — nothing else;
* **analysis**: ``ChunkAnalyser.run`` on the same sentences (tokenise and align, the same
  forward, ``mixing_maps``, the statistics of methods.md#corpus-statistics, top-k exemplars), with
  its own split of the time into prepare / forward / maps / statistics.

Prints sentences per second and the ratio (analysis − forward) / forward, per scope set.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_corpus.py --model all-MiniLM-L6-v2
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_corpus.py --model SmolLM2-135M --sentences 1000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import tl_normmix as nm
from tl_normmix.corpus.chunk import ChunkAnalyser, resolve_device
from tl_normmix.corpus.plan import make_plan

UD = Path(__file__).resolve().parents[2] / "shared" / "data" / "ud"
EWT = [UD / "UD_English-EWT" / f"en_ewt-ud-{split}.conllu" for split in ("dev", "test")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--sentences", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--scope-sets", default="attn_w,attn_n;attn_w,attn_n,attnres_n,attnresln_n")
    args = parser.parse_args()
    device = resolve_device(args.device)
    model = nm.load_model(args.model, device=device, dtype=getattr(torch, args.dtype))
    plan = make_plan(EWT, chunk_size=256, max_sentences=args.sentences)
    chunks = [plan.chunk(c) for c in range(plan.n_chunks)]
    n = len(plan.sentences)
    print(
        f"{args.model}: {n} EWT sentences, batch {args.batch_size}, {device}, {args.dtype}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        "| scopes | forward only | analysis | sentences/s | (analysis − forward) / forward |"
        " prepare | forward | maps | statistics |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for scope_set in args.scope_sets.split(";"):
        scopes = tuple(scope_set.split(","))
        analyser = ChunkAnalyser(model, scopes, batch_size=args.batch_size)
        batches = [b for chunk in chunks for b in analyser.batches(chunk)]
        with torch.no_grad():  # warm-up
            model.run_with_cache(batches[0][0], **batches[0][1])
            analyser.run(chunks[0][: args.batch_size])
        analyser.seconds = dict.fromkeys(analyser.seconds, 0.0)
        start = time.perf_counter()
        with torch.no_grad():
            for tokens, kwargs in batches:
                _, cache = model.run_with_cache(tokens, **kwargs)
                del cache
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        forward = time.perf_counter() - start
        start = time.perf_counter()
        for chunk in chunks:
            analyser.run(chunk)
        analysis = time.perf_counter() - start
        s = analyser.seconds
        print(
            f"| {scope_set} | {forward:.1f} s | {analysis:.1f} s | {n / analysis:.1f} | "
            f"{(analysis - forward) / forward:.2f}× | {s['prepare']:.1f} s | "
            f"{s['forward']:.1f} s | {s['maps']:.1f} s | {s['statistics']:.1f} s |"
        )


if __name__ == "__main__":
    main()
