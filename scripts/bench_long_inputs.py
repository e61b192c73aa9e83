"""Benchmark: maps computed during the forward pass (``run_mixing_maps``) on long inputs.

Parts (``--part``, repeatable):

* ``gpt2``: a GPT-2-small-shaped model (random weights, context raised to the largest ``--n``),
  the five attention-block scopes at each ``--n`` (default 512 1024 2048 4096): the bare forward,
  ``run_with_cache`` + ``mixing_maps`` (the cached route) and ``run_mixing_maps(keep="maps")``;
  seconds, peak memory above the loaded model, and the overhead of the maps over the forward.
* ``smollm2``: SmolLM2-135M (packaged; on CUDA a random model of its shape) at ``--long-n``
  (default 8192) tokens of UD English-EWT, ``keep="stats"`` for the attention-block scopes:
  seconds, peak memory, and where late tokens read from — per layer, the mean share of the first
  token and of the previous 128 tokens for receivers in the last 1,024 positions.
* ``llama1b``: a Llama-shaped model of ~1B parameters (Llama-3.2-1B's shape, random weights) at
  ``--long-n`` tokens, ``keep="stats"`` (for a GPU: ``--device cuda --dtype bfloat16``).

Seconds and peak memory above what was in use before each call: ``scripts/measure.py``. One
process, one measurement after another, after a warm-up.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_long_inputs.py --part gpt2
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_long_inputs.py --part smollm2
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_long_inputs.py --part smollm2 \
        --scopes layer_n --layers 0 12 29      # whole-layer statistics at 8,192 tokens
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from measure import measure as _measure
from measure import release
from random_models import random_model

import tl_normmix as nm

SCOPES = ("attn_w", "attn_n", "attnres_w", "attnres_n", "attnresln_n")
EWT = Path(__file__).resolve().parents[2] / "shared/data/ud/UD_English-EWT"


def measure(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    seconds, peak, _ = _measure(fn, device)
    return seconds, peak


def ewt_tokens(model: Any, n: int) -> torch.Tensor:
    texts: list[str] = []
    for path in sorted(EWT.glob("*.conllu")):
        texts += nm.corpus.conllu_texts(path, 100_000)
    ids = model.to_tokens(" ".join(texts))[:, :n]
    if ids.shape[1] < n:
        raise SystemExit(f"EWT gives only {ids.shape[1]} tokens")
    return ids


def part_gpt2(lengths: list[int], device: str, dtype: torch.dtype) -> list[dict[str, Any]]:
    model = random_model("gpt2", max(lengths), device, dtype)
    vocab = model.cfg.d_vocab
    rows = []

    def forward(toks: torch.Tensor) -> Any:
        with torch.no_grad():
            return model(toks, return_type=None)

    def cached(toks: torch.Tensor) -> Any:
        with torch.no_grad():
            _, cache = model.run_with_cache(toks, names_filter=nm.hook_filter(model, SCOPES))
        return nm.mixing_maps(model, cache, SCOPES)

    warm = torch.randint(0, vocab, (1, 16), device=device)
    forward(warm), cached(warm), nm.run_mixing_maps(model, warm, SCOPES)
    for n in lengths:
        toks = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n)).to(
            device
        )
        release(model)
        base_s, base_m = measure(lambda toks=toks: forward(toks), device)
        release(model)
        cache_s, cache_m = measure(lambda toks=toks: cached(toks), device)
        release(model)
        fwd_s, fwd_m = measure(lambda toks=toks: nm.run_mixing_maps(model, toks, SCOPES), device)
        release(model)
        half_s, half_m = measure(
            lambda toks=toks: nm.run_mixing_maps(model, toks, SCOPES, dtype=torch.float16), device
        )
        rows.append(
            dict(
                part="gpt2",
                n=n,
                forward_s=base_s,
                forward_peak_mib=base_m,
                cached_s=cache_s,
                cached_peak_mib=cache_m,
                run_s=fwd_s,
                run_peak_mib=fwd_m,
                peak_ratio=fwd_m / cache_m,
                overhead_x_forward=(fwd_s - base_s) / base_s,
                run_fp16_s=half_s,
                run_fp16_peak_mib=half_m,
                fp16_peak_ratio=half_m / cache_m,
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


_MODELS: dict[tuple[str, str], Any] = {}


def part_long(
    kind: str,
    n: int,
    device: str,
    dtype: torch.dtype,
    scopes: tuple[str, ...] = SCOPES,
    layers: list[int] | None = None,
) -> list[dict[str, Any]]:
    if kind == "smollm2" and device == "cpu":
        model = nm.load_model("SmolLM2-135M")
        toks = ewt_tokens(model, n)
    else:
        key = (kind, device)
        if key not in _MODELS:  # one model for every length: its context is the longest asked
            _MODELS[key] = random_model(kind, 32768, device, dtype)
        model = _MODELS[key]
        toks = torch.randint(
            0, model.cfg.d_vocab, (1, n), generator=torch.Generator().manual_seed(0)
        )
    toks = toks.to(device)
    warm = toks[:, :16]
    with torch.no_grad():
        model(warm, return_type=None)
    nm.run_mixing_maps(model, warm, scopes, keep="stats", layers=layers)
    release(model)
    base_s, base_m = measure(lambda: _forward(model, toks), device)
    release(model)
    result: dict[str, Any] = {}

    def run() -> Any:
        result["maps"] = nm.run_mixing_maps(
            model, toks, scopes, keep="stats", layers=layers, progress=True
        )
        return None

    run_s, run_m = measure(run, device)
    row = dict(
        part=kind,
        n=n,
        device=device,
        dtype=str(dtype),
        scopes=",".join(scopes),
        layers="all" if layers is None else ",".join(map(str, layers)),
        forward_s=base_s,
        forward_peak_mib=base_m,
        stats_s=run_s,
        stats_peak_mib=run_m,
        overhead_x_forward=(run_s - base_s) / base_s,
    )
    print(json.dumps(row), flush=True)
    maps = result["maps"]
    late = slice(n - 1024, n) if n > 1024 else slice(n // 2, n)
    reach = []
    for scope in [s for s in ("attn_w", "attn_n", "attnresln_n", "layer_n") if s in scopes]:
        stats = maps.stats[scope]
        for index, layer in enumerate(maps.layers):
            reach.append(
                dict(
                    scope=scope,
                    layer=layer,
                    first_token=float(stats.sink_share[index, 0, late].mean()),
                    previous_128=float(stats.window_share[index, 0, late].mean()),
                    itself=float(stats.self_share[index, 0, late].mean()),
                )
            )
    print(json.dumps({"reach": reach}), flush=True)
    return [row]


def _forward(model: Any, toks: torch.Tensor) -> Any:
    with torch.no_grad():
        return model(toks, return_type=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", action="append", choices=["gpt2", "smollm2", "llama1b"])
    parser.add_argument("--n", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--long-n", type=int, nargs="+", default=[8192])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--scopes", nargs="+", default=list(SCOPES), help="long parts' scopes")
    parser.add_argument("--layers", type=int, nargs="+", help="long parts' layers (default all)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}")
    for part in args.part or ["gpt2", "smollm2"]:
        if part == "gpt2":
            part_gpt2(args.n, args.device, dtype)
        else:
            for n in args.long_n:
                try:
                    part_long(part, n, args.device, dtype, tuple(args.scopes), args.layers)
                except torch.OutOfMemoryError as err:  # reported, not hidden
                    print(json.dumps({"part": part, "n": n, "out_of_memory": str(err)[:300]}))
                    torch.cuda.empty_cache() if args.device == "cuda" else None


if __name__ == "__main__":
    main()
