"""Benchmark the whole-layer (feed-forward) maps: time, peak memory, FLOP/s, vs Riemann IG.

Model: GPT-2-small shape with random weights (12 layers, d_model 768, 12 heads, d_mlp 3072,
``gelu_new``), ``GPT2LMHeadModel`` saved to a temporary folder and booted with
``TransformerBridge.boot_transformers``; batch 1, random tokens. Everything is measured on **one
layer** (``layers=[0]``; every layer costs the same) for each N:

* **maps**: ``nm.mixing_maps(model, cache, ("attnreslnff_n", "attnreslnffres_n"), layers=[0])``
  — the FF map ‖IG_ij‖ and the block output map, closed-form IG, default query chunk;
* **per-pair FLOP/s**: ``N² · feedforward.flops_per_pair(...)`` (the first matmul
  ``N²·H·d_ff``, the second ``N²·d_ff·d``, the residual parts ``N²·H·d``; ×2 for multiply-adds)
  divided by the maps time, as a fraction of this machine's plain ``torch.matmul`` throughput on
  the second matmul's shapes (``[N·chunk, d_ff] @ [d_ff, d]``, same chunk), measured here;
* **riemann**: a straightforward Riemann-sum IG at 20 steps (midpoint rule): the FF-input parts
  ``u_ij`` are materialised (``[N, N, d]``) and, at every step, every pair goes through
  ``((u_ij W_in) ⊙ act'(u_i(t) W_in + b_in)) W_out`` and is accumulated; skipped ("n/a") where
  its per-pair hidden tensor ``N²·d_ff`` would exceed ``--riemann-limit-gib`` or its estimated
  time (20 × the maps time) exceeds ``--riemann-max-seconds``.

Peak memory: each task runs in a fresh process; the extra resident memory of the call (see
``bench_attention_block.py``: ``clear_refs`` + ``ru_maxrss``). Time: median of ``--repeats``.

Run (about 10 minutes on 2 CPU cores)::

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_whole_layer.py
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from bench_attention_block import MIB, _measure

N_LAYER, D_MODEL, N_HEAD, D_MLP, VOCAB = 12, 768, 12, 3072, 50257
SCOPES = ("attnreslnff_n", "attnreslnffres_n")
STEPS = 20


def riemann_layer(model: Any, cache: Any, steps: int = STEPS) -> Any:
    """Layer 0's ‖IG_ij‖ by a plain Riemann sum over materialised per-pair parts."""
    import torch

    import tl_normmix as nm
    from tl_normmix.decompose.blocks import Stage
    from tl_normmix.decompose.feedforward import derivative

    adapter = nm.adapt(model)
    roles = {"pattern", "v", "attn_out", "resid_pre", "mlp_out", "ln2.scale"}
    t = adapter.read(cache, 0, roles)
    mlp = t.mlp
    _, post = t.layout.chains(Stage.ATTN_RES_LN)
    norm, scale = t.norms[post[0]], t.scale(post[0])
    f = torch.einsum("bjhd,hdm->bjhm", t.v, t.W_O)
    parts = torch.einsum("bhij,bjhm->bijm", t.pattern, f)  # [b, i, j, d]
    eye = torch.eye(parts.shape[1], dtype=torch.bool)[None, :, :, None]
    parts = norm.linear(parts + eye * t["resid_pre"][:, :, None, :], scale[:, :, None, :])
    bias = norm.apply(t.b_O.expand_as(t["resid_pre"]), scale)
    total = parts.sum(2)
    act = mlp.act
    pre = parts @ mlp.W_in  # [b, i, j, d_ff]
    out = torch.zeros_like(parts)
    for s in range(steps):  # per step: the gradient at u_i(t), applied to every pair's part
        point = bias + (s + 0.5) / steps * total
        grad = derivative(act, point @ mlp.W_in + mlp.b_in)  # [b, i, d_ff]
        out += (pre * grad[:, :, None, :]) @ mlp.W_out
    return (out / steps).norm(dim=-1)


def matmul_gflops(rows: int, repeats: int = 5) -> float:
    """Plain torch.matmul throughput on [rows, d_ff] @ [d_ff, d] (GFLOP/s)."""
    import torch

    a, b = torch.randn(rows, D_MLP), torch.randn(D_MLP, D_MODEL)
    torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - start)
    return 2 * rows * D_MLP * D_MODEL / min(times) / 1e9


def worker(folder: str, task: str, n: int, repeats: int) -> dict:
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    import tl_normmix as nm
    from tl_normmix import memory
    from tl_normmix.decompose import whole_layer

    torch.manual_seed(0)
    with torch.no_grad():
        model = TransformerBridge.boot_transformers(folder)
        model.eval()
        tokens = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))
        _, cache = model.run_with_cache(tokens, names_filter=nm.hook_filter(model, SCOPES))
        if task == "maps":

            def fn() -> Any:
                return nm.mixing_maps(model, cache, SCOPES, layers=[0])
        else:

            def fn() -> Any:
                return riemann_layer(model, cache)

        times, peaks = [], []
        for _ in range(repeats):
            seconds, _, peak, result = _measure(fn)
            del result
            times.append(seconds)
            peaks.append(peak)
        chunk = min(
            n,
            memory.budget() // whole_layer.chunk_bytes(1, n, 1, D_MODEL, D_MLP),
        )
        extra = (
            {"chunk": chunk, "matmul_gflops": matmul_gflops(n * chunk)} if task == "maps" else {}
        )
    return {"times": times, "peaks": peaks, **extra}


def run_task(folder: str, task: str, n: int, repeats: int) -> dict | str:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        try:
            return pool.submit(worker, folder, task, n, repeats).result()
        except BrokenProcessPool:
            return "died (out of memory?)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--riemann-limit-gib", type=float, default=8.0)
    parser.add_argument("--riemann-max-seconds", type=float, default=300.0)
    args = parser.parse_args()

    import transformers

    from tl_normmix.decompose.feedforward import flops_per_pair

    results: dict[tuple[int, str], dict | str] = {}
    with tempfile.TemporaryDirectory(prefix="bench_gpt2_") as folder:
        cfg = transformers.GPT2Config(
            n_layer=N_LAYER, n_embd=D_MODEL, n_head=N_HEAD, n_positions=2048, vocab_size=VOCAB
        )
        transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
        for n in sorted(args.sizes):
            results[(n, "maps")] = run_task(folder, "maps", n, args.repeats)
            print(f"N={n} maps: {results[(n, 'maps')]}", flush=True)
            hidden_gib = 4 * n * n * D_MLP / 2**30
            maps = results[(n, "maps")]
            # Riemann does ~2·STEPS/… the closed form's second matmul work: estimate from maps.
            estimate = (
                statistics.median(maps["times"]) * STEPS if isinstance(maps, dict) else float("inf")
            )
            if hidden_gib > args.riemann_limit_gib or estimate > args.riemann_max_seconds:
                results[(n, "riemann")] = (
                    f"n/a (≈{hidden_gib:.1f} GiB per-pair hidden, ≈{estimate:.0f} s estimated)"
                )
            else:
                results[(n, "riemann")] = run_task(folder, "riemann", n, 1)
            print(f"N={n} riemann: {results[(n, 'riemann')]}", flush=True)

    print("\nOne layer (layer 0), GPT-2-small shape, batch 1, closed-form IG, scopes", SCOPES)
    print()
    print(
        "| N | maps s | maps peak MiB | per-pair GFLOP | achieved GFLOP/s | plain matmul GFLOP/s "
        "| fraction | Riemann-IG (20 steps) s | Riemann peak MiB | speed-up |"
    )
    print("|" + "---|" * 10)
    for n in sorted(args.sizes):
        maps, riemann = results[(n, "maps")], results[(n, "riemann")]
        if not isinstance(maps, dict):
            print(f"| {n} | {maps} |")
            continue
        seconds = statistics.median(maps["times"])
        flops = n * n * flops_per_pair(D_MODEL, D_MLP, N_HEAD, False)
        achieved = flops / seconds / 1e9
        if isinstance(riemann, dict):
            rs = statistics.median(riemann["times"])
            r_text, rm_text, speed = (
                f"{rs:.2f}",
                f"{max(riemann['peaks']) / MIB:.0f}",
                f"{rs / seconds:.1f}×",
            )
        else:
            r_text, rm_text, speed = riemann, "n/a", "n/a"
        print(
            f"| {n} | {seconds:.3f} | {max(maps['peaks']) / MIB:.0f} | {flops / 1e9:.1f} "
            f"| {achieved:.1f} | {maps['matmul_gflops']:.1f} (rows {n}×{maps['chunk']}) "
            f"| {achieved / maps['matmul_gflops']:.2f} | {r_text} | {rm_text} | {speed} |"
        )


if __name__ == "__main__":
    main()
