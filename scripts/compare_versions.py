"""Two versions of tl_normmix in one process, timed interleaved on the same workloads: the one
installed here and a git revision of this repository (exported and renamed ``tl_normmix_old``).
For refactors that must not slow anything down: each workload runs old, new, old, new, … and the
fastest of each is compared.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/compare_versions.py --rev a2504b4 --part attention
    (parts: attention, vz, patching, corpus, decompose; default all)

Workloads (random weights unless named): the five attention-block scopes on a GPT-2-small shape
at N = 512 (``bench_attention_block.py``'s), ALTI, ``run_mixing_maps``, whole-layer maps at
N = 512 (``bench_whole_layer.py``'s), ``decompose_model``; value zeroing on all-MiniLM-L6-v2; the
SmolLM2 IOI knock-out sweep (``bench_patching.py``'s); a corpus chunk of 256 EWT sentences on
MiniLM (``bench_corpus.py``'s).
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from random_models import random_model

import tl_normmix as new

ROOT = Path(__file__).resolve().parents[1]
EWT = ROOT.parent / "shared" / "data" / "ud" / "UD_English-EWT" / "en_ewt-ud-dev.conllu"


def old_package(rev: str) -> Any:
    """``tl_normmix`` at ``rev``, importable as ``tl_normmix_old``."""
    folder = Path(tempfile.mkdtemp(prefix="tl_normmix_old-"))
    archive = folder / "old.tar"
    with archive.open("wb") as handle:
        subprocess.run(["git", "archive", rev, "tl_normmix"], cwd=ROOT, stdout=handle, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    package = folder / "tl_normmix"
    for path in package.rglob("*.py"):
        text = re.sub(r"\btl_normmix\b", "tl_normmix_old", path.read_text())
        path.write_text(text)
    package.rename(folder / "tl_normmix_old")
    sys.path.insert(0, str(folder))
    import tl_normmix_old

    return tl_normmix_old


def interleave(name: str, make: Any, repeats: int = 3) -> None:
    runs: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(repeats):
        for tag in ("old", "new"):
            fn = make(tag)
            gc.collect()
            start = time.perf_counter()
            fn()
            runs[tag].append(time.perf_counter() - start)
    o, n = min(runs["old"]), min(runs["new"])
    medians = f"medians {statistics.median(runs['old']):.3f} / {statistics.median(runs['new']):.3f}"
    print(f"| {name} | {o:.3f} s | {n:.3f} s | {n / o:.2f} | {medians} |", flush=True)


def quiet(package: Any) -> dict[str, Any]:
    """Keyword arguments that turn a version's default progress bars off, where it has them."""
    return {"progress": False} if package is new else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the git revision to compare against")
    parser.add_argument(
        "--part", choices=["all", "attention", "vz", "patching", "corpus", "decompose"]
    )
    args = parser.parse_args()
    part = args.part or "all"
    old = old_package(args.rev)
    pkg = {"old": old, "new": new}
    print("| workload | old | new | new / old | |\n|---|---|---|---|---|")
    if part in ("all", "attention"):
        gpt2 = random_model("gpt2", 1024)
        toks = torch.randint(0, 100, (1, 512)) + 2
        scopes = ("attn_w", "attn_n", "attnres_w", "attnres_n", "attnresln_n")
        _, cache = gpt2.run_with_cache(toks, names_filter=new.hook_filter(gpt2, scopes))
        interleave(
            "attention block, GPT-2 shape, N=512, 5 scopes, 12 layers",
            lambda tag: lambda: pkg[tag].mixing_maps(gpt2, cache, scopes),
        )
        _, cache2 = gpt2.run_with_cache(toks[:, :256], names_filter=new.hook_filter(gpt2, "alti"))
        interleave(
            "alti, GPT-2 shape, N=256",
            lambda tag: lambda: pkg[tag].mixing_maps(gpt2, cache2, "alti"),
        )
        interleave(
            "run_mixing_maps attn_n + attnresln_n, GPT-2 shape, N=512",
            lambda tag: lambda: pkg[tag].run_mixing_maps(gpt2, toks, ("attn_n", "attnresln_n")),
        )
        whole = ("attnreslnff_n", "attnreslnffres_n")
        _, cw = gpt2.run_with_cache(toks, names_filter=new.hook_filter(gpt2, whole))
        interleave(
            "whole layer, GPT-2 shape, N=512, layer 0",
            lambda tag: lambda: pkg[tag].mixing_maps(gpt2, cw, whole, layers=[0]),
        )
    if part in ("all", "decompose"):
        gpt2 = random_model("gpt2", 1024)
        toks = torch.randint(0, 100, (1, 256)) + 2
        for n in (128, 256):
            _, c = gpt2.run_with_cache(toks[:, :n], names_filter=new.hook_filter(gpt2, "layer_n"))
            interleave(
                f"decompose_model, GPT-2 shape, N={n}",
                lambda tag, c=c: lambda: pkg[tag].decompose_model(gpt2, c, **quiet(pkg[tag])),
                repeats=2,
            )
    if part in ("all", "vz"):
        minilm = new.load_model("all-MiniLM-L6-v2")
        t = torch.randint(1000, 5000, (1, 256))
        interleave(
            "value_zeroing, MiniLM, N=256",
            lambda tag: lambda: pkg[tag].value_zeroing(minilm, t, **quiet(pkg[tag])),
            repeats=2,
        )
    if part in ("all", "patching"):
        smol = new.load_model("SmolLM2-135M")
        toks = smol.to_tokens("When Mary and John went to the store, John gave a drink to")
        with torch.no_grad():
            top = smol(toks)[0, -1].argmax()

        def metric(logits: torch.Tensor) -> torch.Tensor:
            return logits[:, -1].log_softmax(-1)[:, top]

        def sweep(tag: str) -> Any:
            m = pkg[tag]
            return lambda: m.knock_out(smol, toks, m.edges(heads="each"), metric, **quiet(m))

        interleave("knock_out, SmolLM2 IOI, 4,050 (layer, head, source) edges", sweep, repeats=2)
    if part in ("all", "corpus"):
        from tl_normmix.corpus.chunk import ChunkAnalyser
        from tl_normmix.corpus.plan import make_plan

        minilm = new.load_model("all-MiniLM-L6-v2")
        chunk = make_plan([EWT], 256, 256).chunk(0)
        analysers = {
            tag: pkg[tag].corpus.chunk.ChunkAnalyser(minilm, ("attn_w", "attn_n"), batch_size=16)
            if tag == "old"
            else ChunkAnalyser(minilm, ("attn_w", "attn_n"), batch_size=16)
            for tag in pkg
        }
        interleave(
            "corpus chunk, MiniLM, 256 EWT sentences, attn_w + attn_n",
            lambda tag: lambda: analysers[tag].run(chunk),
        )


if __name__ == "__main__":
    main()
