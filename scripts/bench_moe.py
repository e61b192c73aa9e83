"""Mixtures of experts through the whole-layer scopes: completeness and time of ``layer_n`` with the
path cut at router switches against the plain quadrature (the router not read), on the tiny test
families (raw and processed) and on a GPT-2-small-shaped GPT-OSS model (random weights and
biases). Both variants run in the same process, interleaved; times are the minimum of ``--repeat``.

    python scripts/bench_moe.py [--tokens 32 64] [--repeat 2]
    .venv-tl2/bin/python scripts/bench_moe.py --tiny-only      # TransformerLens 2.x's MoE
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import tl_normmix as nm
from tl_normmix.models import ff_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

READ_ROUTER = ff_module.read_router


def _timed(run: Callable[[], nm.MixingMaps], repeat: int) -> tuple[float, float]:
    best, worst = float("inf"), 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        maps = run()
        best = min(best, time.perf_counter() - start)
        worst = float(maps.completeness["layer_n"].nan_to_num(0.0).max())
    return worst, best


def compare(model, toks: torch.Tensor, repeat: int) -> dict[str, tuple[float, float]]:
    _, cache = model.run_with_cache(toks, names_filter=nm.hook_filter(model, "layer_n"))
    out: dict[str, tuple[float, float]] = {}
    variants = {"plain": lambda module, d: None, "cut": READ_ROUTER}
    for _ in range(repeat):
        for name, reader in variants.items():
            ff_module.read_router = reader
            try:
                with warnings.catch_warnings():  # the plain path's residuals are the point
                    warnings.simplefilter("ignore", nm.CompletenessWarning)
                    result = _timed(lambda: nm.mixing_maps(model, cache, "layer_n"), 1)
            finally:
                ff_module.read_router = READ_ROUTER
            previous = out.get(name, (0.0, float("inf")))
            out[name] = (result[0], min(previous[1], result[1]))
    return out


def tiny(repeat: int) -> None:
    from helpers import tiny_models as tm

    families = dict(tm.FAMILIES) if tm.TL_MAJOR >= 4 else {"moe": None}
    moe = ("mixtral", "qwen2_moe", "olmoe", "gpt_oss", "deepseek_v3", "moe")
    root = Path(tempfile.mkdtemp())
    print("| family | mode | completeness, plain | completeness, cut | time plain | time cut |")
    print("|---|---|---|---|---|---|")
    for family in (f for f in moe if f in families):
        for mode in ("raw", "processed"):
            model = tm.build(tm.Case(family, mode), root)
            toks = tm.tokens(2, 8, seed=3)
            r = compare(model, toks, repeat)
            print(
                f"| {family} | {mode} | {r['plain'][0]:.1e} | {r['cut'][0]:.1e} | "
                f"{r['plain'][1] * 1e3:.0f} ms | {r['cut'][1] * 1e3:.0f} ms |",
                flush=True,
            )


def gpt2_shaped(lengths: list[int], repeat: int) -> None:
    from random_models import random_model

    model = random_model("gpt2-moe", max(lengths), biases=0.1)
    print(
        "\n| GPT-2-small-shaped GPT-OSS (2 blocks) | completeness, plain | completeness, cut | "
        "time plain | time cut | cut / plain |"
    )
    print("|---|---|---|---|---|---|")
    for n in lengths:
        toks = torch.randint(2, 100, (1, n), generator=torch.Generator().manual_seed(n))
        r = compare(model, toks, repeat)
        ratio = r["cut"][1] / r["plain"][1]
        print(
            f"| N = {n} | {r['plain'][0]:.1e} | {r['cut'][0]:.1e} | {r['plain'][1]:.2f} s | "
            f"{r['cut'][1]:.2f} s | {ratio:.2f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--tiny-only", action="store_true", help="TransformerLens 2.x: no GPT-OSS")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU float32\n")
    if not args.skip_tiny:
        tiny(args.repeat)
    if not args.tiny_only:
        gpt2_shaped(args.tokens, args.repeat)


if __name__ == "__main__":
    main()
