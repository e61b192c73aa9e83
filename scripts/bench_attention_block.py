"""Benchmark attention-block mixing maps against the model's forward pass and a direct reference.

What it measures, for a GPT-2-small-shaped model with random weights (12 layers, d_model 768,
12 heads; ``GPT2LMHeadModel`` saved to a temporary folder and booted with
``TransformerBridge.boot_transformers``), batch 1, random tokens, for each sequence length N:

* **forward**: ``model.run_with_cache(tokens, names_filter=nm.hook_filter(model, scopes))``;
* **maps**: ``nm.mixing_maps(model, cache, scopes)`` for all layers (``scopes`` default: all five);
* **reference**: a direct implementation that, per layer, materialises the per-pair vectors the
  way ``tests/test_residual.py::_reference`` does — ``[batch, head, query, key, d_model]``
  per-head vectors ``α^h_ij f^h(x_j)`` for ``attn_n``, ``[batch, query, key, d_model]`` vectors
  ``F_i(x_j)`` for ``attn_n``/``attnres_n``/``attnresln_n`` — and takes their norms (plus the
  mixing ratios and the trivial weight scopes, so it returns what ``mixing_maps`` returns). It is
  skipped ("n/a") where the estimated peak exceeds ``--reference-limit-gib`` (default 16 GiB),
  i.e. N=2048, or where it dies (out of memory).

Everything runs under ``torch.no_grad()`` on the CPU with torch's default thread count.

How:

* **Time**: wall-clock (``time.perf_counter``) of the call alone, ``--repeats`` times (default 3);
  the median is reported. A task stops repeating once its measured calls have taken more than
  ``--max-task-seconds`` (default 120 s). Process CPU time (``time.process_time``, all threads)
  is printed too, with a CPU-time table: it is less disturbed by other load on the machine.
* **Peak memory**: each measured thing (N, task) runs in a *fresh* process (``multiprocessing``
  with the ``spawn`` start method), which boots the model and, for maps and reference, first runs
  the forward pass to obtain the cache. Before every measured call the process runs
  ``gc.collect()`` and glibc ``malloc_trim(0)`` (so freed heap pages are returned to the OS),
  then resets its peak resident set size by writing ``5`` to ``/proc/self/clear_refs`` (Linux ≥
  4.0; this resets ``VmHWM`` and hence ``getrusage(RUSAGE_SELF).ru_maxrss``), and reads the
  current RSS as the baseline. The reported peak is ``ru_maxrss`` after the call minus that
  baseline: the peak *additional* resident memory of the call, including its result (for the
  forward pass: logits and cache; for maps and reference: the maps, not the cache they read).
  The maximum over the repeats is reported. If ``clear_refs`` is not writable, a background
  thread samples ``/proc/self/statm`` every millisecond instead (may miss short spikes).
  ``tracemalloc`` is not used: it does not see torch's allocations.

Run it (from the repository root; takes about 10–20 minutes on 2 CPU cores):

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_attention_block.py

Options: ``--sizes 128 512 2048`` ``--scopes attn_w attn_n attnres_w attnres_n attnresln_n``
``--repeats 3`` ``--reference-limit-gib 16`` ``--max-task-seconds 120``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import gc
import itertools
import math
import multiprocessing
import os
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from tqdm import tqdm

ALL_SCOPES = ("attn_w", "attn_n", "attnres_w", "attnres_n", "attnresln_n")
TASKS = ("forward", "maps", "reference")
N_LAYER, D_MODEL, N_HEAD, VOCAB = 12, 768, 12, 50257
MIB = 2**20
GIB = 2**30


# -- memory measurement -----------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset VmHWM (and so ``ru_maxrss``) to the current RSS; False if the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _measure(fn: Callable[[], Any]) -> tuple[float, float, int, Any]:
    """(wall seconds, CPU seconds, peak additional bytes, result) of one call of ``fn``."""
    _trim()
    sampler = None
    if _reset_peak():
        base = _rss_bytes()
        # ru_maxrss is in KiB on Linux; right after the reset it equals the current RSS.
        base = max(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    else:
        base = _rss_bytes()
        sampler = _Sampler()
        sampler.start()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if sampler is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    else:
        peak = sampler.stop()
    return seconds, cpu, max(peak - base, 0), result


class _Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _rss_bytes()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, _rss_bytes())


# -- the direct reference ---------------------------------------------------------------------
def reference_maps(model: Any, cache: Any, scopes: tuple[str, ...]) -> dict[str, Any]:
    """All layers' maps by materialising every per-pair vector (tests/test_residual.py)."""
    import torch

    import tl_normmix as nm
    from tl_normmix.maps.engine import roles_of as _roles
    from tl_normmix.maps.scopes import SCOPES, resolve_scopes

    adapter = nm.adapt(model)
    layout = adapter.layout
    roles = _roles(resolve_scopes(scopes), adapter, False)
    maps: dict[str, list[Any]] = {}
    heads: dict[str, list[Any]] = {}
    ratios: dict[str, list[Any]] = {}

    def keep(out: dict[str, list[Any]], scope: str, tensor: Any) -> None:
        out.setdefault(scope, []).append(tensor)

    def norms_and_ratio(parts: Any) -> tuple[Any, Any]:
        eye = torch.eye(parts.shape[1], dtype=torch.bool)[None, :, :, None]
        context = parts.masked_fill(eye, 0.0).sum(2).norm(dim=-1)
        own = parts.diagonal(dim1=1, dim2=2).norm(dim=1)
        return parts.norm(dim=-1), context / (context + own)

    for layer in range(adapter.spec.n_layers):
        t = adapter.read(cache, layer, roles)
        alpha = t.pattern  # no padding: the reference's mask is all ones
        weights = alpha.mean(dim=1)
        eye = torch.eye(weights.shape[-1])
        off = (weights * (1 - eye)).sum(-1)
        if "attn_w" in scopes:
            keep(maps, "attn_w", weights)
            keep(heads, "attn_w", alpha)
            keep(ratios, "attn_w", off)
        if "attnres_w" in scopes:
            keep(maps, "attnres_w", 0.5 * weights + 0.5 * eye)
            keep(ratios, "attnres_w", 0.5 * off)
        if not any(s in scopes for s in ("attn_n", "attnres_n", "attnresln_n")):
            continue
        f = torch.einsum("bjhd,hdm->bjhm", t.v, t.W_O)
        if "attn_n" in scopes:
            per_head = torch.einsum("bhij,bjhm->bhijm", alpha, f)  # [b, h, i, j, d]
            keep(heads, "attn_n", per_head.norm(dim=-1))
            del per_head
        for scope in ("attn_n", "attnres_n", "attnresln_n"):
            if scope not in scopes:
                continue
            parts = torch.einsum("bhij,bjhm->bijm", alpha, f)  # [b, i, j, d]
            if scope != "attn_n":
                pre, post = layout.chains(SCOPES[scope].stage)
                for name in pre:
                    parts = t.norms[name].linear(parts, t.scale(name)[:, :, None, :])
                diag = torch.eye(parts.shape[1], dtype=torch.bool)[None, :, :, None]
                parts = parts + diag * t["resid_pre"][:, :, None, :]
                for name in post:
                    parts = t.norms[name].linear(parts, t.scale(name)[:, :, None, :])
            norm, ratio = norms_and_ratio(parts)
            del parts
            keep(maps, scope, norm)
            keep(ratios, scope, ratio)
    stack = torch.stack
    return {
        "maps": {k: stack(v) for k, v in maps.items()},
        "heads": {k: stack(v) for k, v in heads.items()},
        "ratios": {k: stack(v) for k, v in ratios.items()},
    }


def reference_estimate_bytes(n: int, scopes: tuple[str, ...]) -> int:
    """Peak estimate of the reference: per-head tensor + a few [b, i, j, d] tensors + outputs."""
    per_head = 4 * N_HEAD * n * n * D_MODEL if "attn_n" in scopes else 0
    parts = 3 * 4 * n * n * D_MODEL
    outputs = 4 * N_LAYER * n * n * (len(scopes) + N_HEAD * 2)
    return per_head + parts + outputs


# -- one measured task in a fresh process -----------------------------------------------------
def worker(
    folder: str, task: str, n: int, scopes: tuple[str, ...], repeats: int, max_seconds: float
) -> dict:
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    import tl_normmix as nm

    torch.manual_seed(0)
    with torch.no_grad():
        model = TransformerBridge.boot_transformers(folder)
        model.eval()
        tokens = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))
        names = nm.hook_filter(model, scopes)

        def forward() -> Any:
            return model.run_with_cache(tokens, names_filter=names)

        cache = None
        if task != "forward":
            logits, cache = forward()
            del logits

        if task == "forward":
            fn = forward
        elif task == "maps":

            def fn() -> Any:
                return nm.mixing_maps(model, cache, scopes)

        else:

            def fn() -> Any:
                return reference_maps(model, cache, scopes)

        times, cpus, peaks = [], [], []
        for _ in tqdm(range(repeats), desc=f"  N={n} {task}", leave=False, position=1):
            if sum(times) > max_seconds:  # enough: a slow task is not repeated forever
                break
            seconds, cpu, peak, result = _measure(fn)
            if task == "forward":
                cache_bytes = sum(t.numel() * t.element_size() for t in result[1].values())
            del result
            times.append(seconds)
            cpus.append(cpu)
            peaks.append(peak)
        if cache is not None:
            cache_bytes = sum(t.numel() * t.element_size() for t in cache.values())
    return {"times": times, "cpus": cpus, "peaks": peaks, "cache_bytes": cache_bytes}


def run_task(
    folder: str, task: str, n: int, scopes: tuple[str, ...], repeats: int, max_seconds: float
) -> dict | str:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        try:
            return pool.submit(worker, folder, task, n, scopes, repeats, max_seconds).result()
        except BrokenProcessPool:
            return "died (out of memory?)"
        except RuntimeError as err:  # e.g. torch's "not enough memory"
            return f"failed: {str(err).splitlines()[0][:80]}"


# -- report -----------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def report(results: dict[tuple[int, str], dict | str], sizes: list[int]) -> str:
    def time_of(n: int, task: str) -> float | None:
        r = results.get((n, task))
        return statistics.median(r["times"]) if isinstance(r, dict) else None

    def cpu_of(n: int, task: str) -> float | None:
        r = results.get((n, task))
        return statistics.median(r["cpus"]) if isinstance(r, dict) else None

    def peak_of(n: int, task: str) -> float | None:
        r = results.get((n, task))
        return max(r["peaks"]) / MIB if isinstance(r, dict) else None

    header = (
        "| N | forward s | forward peak MiB | maps s | maps peak MiB | reference s "
        "| reference peak MiB | speed-up vs reference | memory ratio vs reference "
        "| maps / forward time |"
    )
    lines = [header, "|" + "---|" * 10]
    for n in sizes:
        fs, fm = time_of(n, "forward"), peak_of(n, "forward")
        ms, mm = time_of(n, "maps"), peak_of(n, "maps")
        rs, rm = time_of(n, "reference"), peak_of(n, "reference")
        ref = results.get((n, "reference"))
        speed = rs / ms if rs is not None and ms else None
        memory = rm / mm if rm is not None and mm else None
        ratio = ms / fs if ms is not None and fs else None
        rs_text = ref if isinstance(ref, str) else _fmt(rs, ".2f")
        rm_text = ref if isinstance(ref, str) else _fmt(rm, ".0f")
        lines.append(
            f"| {n} | {_fmt(fs, '.3f')} | {_fmt(fm, '.0f')} | {_fmt(ms, '.3f')} "
            f"| {_fmt(mm, '.0f')} | {rs_text} | {rm_text} | {_fmt(speed, '.1f')}× "
            f"| {_fmt(memory, '.1f')}× | {_fmt(ratio, '.2f')} |"
        )
    lines.append("")
    lines.append("Scaling between successive N (ratio; exponent k in cost ∝ N^k):")
    lines.append("")
    lines.append("| N → N' | forward s | forward MiB | maps s | maps MiB | reference s | ref MiB |")
    lines.append("|" + "---|" * 7)
    for a, b in itertools.pairwise(sizes):
        cells = []
        for task in TASKS:
            for get in (time_of, peak_of):
                x, y = get(a, task), get(b, task)
                if x and y:
                    k = math.log(y / x) / math.log(b / a)
                    cells.append(f"{y / x:.1f}× (k={k:.2f})")
                else:
                    cells.append("n/a")
        lines.append(f"| {a} → {b} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("CPU seconds (median; process time of all threads, less sensitive to other load):")
    lines.append("")
    lines.append("| N | forward CPU s | maps CPU s | reference CPU s | speed-up | maps / forward |")
    lines.append("|" + "---|" * 6)
    for n in sizes:
        fc, mc, rc = (cpu_of(n, task) for task in TASKS)
        speed = rc / mc if rc is not None and mc else None
        ratio = mc / fc if mc is not None and fc else None
        lines.append(
            f"| {n} | {_fmt(fc, '.2f')} | {_fmt(mc, '.2f')} | {_fmt(rc, '.2f')} "
            f"| {_fmt(speed, '.1f')}× | {_fmt(ratio, '.2f')} |"
        )
    cache = {n: r["cache_bytes"] for (n, t), r in results.items() if isinstance(r, dict)}
    lines.append("")
    lines.append(
        "Cache held (hooks kept by hook_filter): "
        + ", ".join(f"N={n}: {cache[n] / MIB:.0f} MiB" for n in sizes if n in cache)
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--scopes", nargs="+", default=list(ALL_SCOPES), choices=ALL_SCOPES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-limit-gib", type=float, default=16.0)
    parser.add_argument("--max-task-seconds", type=float, default=120.0)
    args = parser.parse_args()
    scopes = tuple(args.scopes)
    sizes = sorted(args.sizes)

    import transformers

    with tempfile.TemporaryDirectory(prefix="bench_gpt2_") as folder:
        cfg = transformers.GPT2Config(
            n_layer=N_LAYER, n_embd=D_MODEL, n_head=N_HEAD, n_positions=2048, vocab_size=VOCAB
        )
        transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
        results: dict[tuple[int, str], dict | str] = {}
        jobs = [(n, task) for n in sizes for task in TASKS]
        bar = tqdm(jobs, desc="benchmark", position=0)
        for n, task in bar:
            bar.set_postfix_str(f"N={n} {task}")
            if task == "reference":
                need = reference_estimate_bytes(n, scopes)
                if need > args.reference_limit_gib * GIB:
                    results[(n, task)] = f"n/a (would need {need / GIB:.0f} GiB)"
                    continue
            results[(n, task)] = run_task(
                folder, task, n, scopes, args.repeats, args.max_task_seconds
            )
        bar.close()
    print()
    print(f"Scopes: {', '.join(scopes)}; batch 1; {args.repeats} repeats (median time, max peak)")
    print()
    print(report(results, sizes))
    for (n, task), r in results.items():
        if isinstance(r, dict):
            times = ", ".join(f"{t:.3f}" for t in r["times"])
            cpus = ", ".join(f"{t:.3f}" for t in r["cpus"])
            peaks = ", ".join(f"{p / MIB:.0f}" for p in r["peaks"])
            print(f"  raw N={n} {task}: wall s [{times}], CPU s [{cpus}], peak MiB [{peaks}]")


if __name__ == "__main__":
    main()
