"""Benchmark: the peers' methods in tl_normmix (issue 13) against a plain forward, same process.

For each model and length: a plain forward (``model(tokens)``), then

* ``alti`` (and ``globenc_n`` on post-LN encoders): ``run_with_cache`` with ``hook_filter`` +
  ``mixing_maps``; the per-head routes (``maps.heads["alti"]``, built on access) timed apart;
* ``value_zeroing(model, tokens)`` (every layer and source);
* ``decompose_model(model, cache)`` (every block), with its cache run included.

Wall-clock seconds (``time.perf_counter``, after one warm-up call of each on 8 tokens), the ratio
to the forward, and the peak resident memory above the baseline (``ru_maxrss`` after resetting it
via ``/proc/self/clear_refs``). Text: UD English-EWT dev sentences joined, cut to ``N`` tokens.
On CUDA (``--device cuda``) times are synchronised and memory is ``torch.cuda.max_memory_allocated``.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_methods.py            # MiniLM 512, SmolLM2 256
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_methods.py --model all-MiniLM-L6-v2 --n 128
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import tl_normmix as nm

EWT = Path(__file__).resolve().parents[2] / "shared/data/ud/UD_English-EWT/en_ewt-ud-dev.conllu"


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_above(base: float, device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20 - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base


def timed(fn: Callable[[], Any], device: str) -> tuple[float, float, Any]:
    reset_peak(device)
    base = torch.cuda.memory_allocated() / 2**20 if device == "cuda" else rss_mib()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, peak_above(base, device), out


def tokens_of(model: Any, n: int) -> torch.Tensor:
    texts = nm.corpus.conllu_texts(EWT, 400)
    toks = model.to_tokens(" ".join(texts))
    toks = toks[0] if isinstance(toks, tuple) else toks
    if toks.shape[1] < n:
        sys.exit(f"The text gives only {toks.shape[1]} tokens; ask for fewer.")
    return toks[:, :n]


def bench(name: str, n: int, device: str, dtype: torch.dtype) -> list[dict[str, Any]]:
    model = nm.load_model(name, device=device, dtype=dtype)
    toks = tokens_of(model, n).to(device)
    layout = nm.adapt(model).layout
    scopes = ("alti", "globenc_n") if layout.name.startswith("post_ln") else ("alti",)
    rows: list[dict[str, Any]] = []

    def forward() -> Any:
        with torch.no_grad():
            return model(toks)

    def maps_of(t: torch.Tensor) -> Any:
        with torch.no_grad():
            _, cache = model.run_with_cache(t, names_filter=nm.hook_filter(model, scopes))
        return nm.mixing_maps(model, cache, scopes)

    def decompose(t: torch.Tensor) -> Any:
        with torch.no_grad():
            _, cache = model.run_with_cache(t, names_filter=nm.hook_filter(model, "layer_n"))
        return nm.decompose_model(model, cache)

    warm = toks[:, :8]
    forward()
    maps_of(warm).heads["alti"]
    nm.value_zeroing(model, warm)
    decompose(warm)

    seconds, memory, _ = timed(forward, device)
    rows.append(dict(model=name, n=n, method="forward", seconds=seconds, peak_mib=memory))
    base_seconds = seconds
    seconds, memory, maps = timed(lambda: maps_of(toks), device)
    rows.append(dict(model=name, n=n, method="+".join(scopes), seconds=seconds, peak_mib=memory))
    seconds, memory, _ = timed(lambda: maps.heads["alti"], device)
    rows.append(dict(model=name, n=n, method="alti routes", seconds=seconds, peak_mib=memory))
    del maps
    seconds, memory, _ = timed(lambda: nm.value_zeroing(model, toks), device)
    rows.append(dict(model=name, n=n, method="value_zeroing", seconds=seconds, peak_mib=memory))
    seconds, memory, dm = timed(lambda: decompose(toks), device)
    worst = float(dm.completeness.nan_to_num().max())
    rows.append(
        dict(
            model=name,
            n=n,
            method="decompose_model",
            seconds=seconds,
            peak_mib=memory,
            note=f"completeness {worst:.1e}",
        )
    )
    for row in rows:
        row["x_forward"] = row["seconds"] / base_seconds
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model (repeatable); default both")
    parser.add_argument("--n", type=int, action="append", help="tokens per model (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    models = args.model or ["all-MiniLM-L6-v2", "SmolLM2-135M"]
    lengths = args.n or ([512, 256] if not args.model else [512] * len(models))
    if len(lengths) != len(models):
        sys.exit("Give one --n per --model.")
    dtype = getattr(torch, args.dtype)
    import pandas as pd

    rows = []
    for name, n in zip(models, lengths, strict=True):
        rows += bench(name, n, args.device, dtype)
    table = pd.DataFrame(rows).fillna("")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3g}"))


if __name__ == "__main__":
    main()
