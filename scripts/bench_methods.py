"""Benchmark: the peers' methods in tl_normmix against a plain forward, same process.

For each model and length: a plain forward (``model(tokens)``), then

* ``alti`` (and ``globenc_n`` on post-LN encoders): ``run_with_cache`` with ``hook_filter`` +
  ``mixing_maps``; the per-head routes (``maps.heads["alti"]``, built on access) timed apart;
* ``value_zeroing(model, tokens)`` (every layer and source);
* ``decompose_model(model, cache)`` (every block), with its cache run included.

Wall-clock seconds (after one warm-up call of each on 8 tokens), the ratio to the forward, and the
peak memory above what was in use before the call (``scripts/measure.py``; CPU or CUDA). Text: UD
English-EWT dev sentences joined, cut to ``N`` tokens; ``--random``: random weights of the same
shapes and random token ids (a GPU machine has no packaged model).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_methods.py            # MiniLM 512, SmolLM2 256
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_methods.py --model all-MiniLM-L6-v2 --n 128
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from measure import measure

import tl_normmix as nm

EWT = Path(__file__).resolve().parents[2] / "shared/data/ud/UD_English-EWT/en_ewt-ud-dev.conllu"


def timed(fn: Callable[[], Any], device: str) -> tuple[float, float, Any]:
    return measure(fn, device)


def tokens_of(model: Any, n: int) -> torch.Tensor:
    texts = nm.corpus.conllu_texts(EWT, 400)
    toks = model.to_tokens(" ".join(texts))
    toks = toks[0] if isinstance(toks, tuple) else toks
    if toks.shape[1] < n:
        sys.exit(f"The text gives only {toks.shape[1]} tokens; ask for fewer.")
    return toks[:, :n]


#: Random-weight stand-ins of the packaged models' shapes (``--random``: e.g. on a GPU machine).
SHAPES = {"all-MiniLM-L6-v2": "minilm", "SmolLM2-135M": "smollm2"}


def bench(
    name: str, n: int, device: str, dtype: torch.dtype, random: bool = False
) -> list[dict[str, Any]]:
    if random:
        from random_models import random_model

        model = random_model(SHAPES[name], max(n, 512), device, dtype)
        generator = torch.Generator().manual_seed(0)
        toks = torch.randint(200, 1000, (1, n), generator=generator).to(device)
        name = f"{name} shape (random)"
    else:
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
    parser.add_argument("--random", action="store_true", help="random weights of the same shapes")
    args = parser.parse_args()
    models = args.model or ["all-MiniLM-L6-v2", "SmolLM2-135M"]
    lengths = args.n or ([512, 256] if not args.model else [512] * len(models))
    if len(lengths) != len(models):
        sys.exit("Give one --n per --model.")
    dtype = getattr(torch, args.dtype)
    import pandas as pd

    rows = []
    for name, n in zip(models, lengths, strict=True):
        rows += bench(name, n, args.device, dtype, args.random)
    table = pd.DataFrame(rows).fillna("")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3g}"))


if __name__ == "__main__":
    main()
