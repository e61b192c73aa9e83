"""Benchmark the adapter's self-check and the generic feed-forward path.

1. **Self-check cost** as a share of ``mixing_maps`` on a GPT-2-small-shaped model (random
   weights, 12 layers, d_model 768, 12 heads), batch 1, N tokens: the cache is made once with
   ``hook_filter(model, scopes)`` (which adds the check's few hooks), then ``mixing_maps`` runs
   with ``verify=False`` and ``verify=True`` alternately, ``--repeats`` times each, and the time
   spent inside ``models.checks.verify_layer`` is summed by wrapping it. Reported: the fastest of
   the repeats (least disturbed by other load) of the maps without and with the check and of the
   check's own time, the check's share of the maps time, and the end-to-end overhead. For the
   five attention-block scopes (all layers) and for ``layer_n`` (``--whole-layers`` layers).
2. **Generic feed-forward path against the closed form**: one layer's ``whole_layer_maps`` with
   the MLP as an ``MLPSpec`` (closed form) and as an opaque ``FFModule`` of the same function
   (32-point Gauss–Legendre quadrature of forward-mode derivatives), same process, same tensors;
   on a tiny model (d_model 32) and on the GPT-2-small shape.

Same process for each ratio; one torch process at a time; 2 CPU cores here.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_adapter.py [--size 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import tiny_models

import tl_normmix as nm
from tl_normmix.decompose import whole_layer
from tl_normmix.decompose.blocks import FFModule, Stage
from tl_normmix.maps import engine as maps_module

ATTENTION = ("attn_w", "attn_n", "attnres_w", "attnres_n", "attnresln_n")


def gpt2_small(root: Path):
    import transformers as T
    from transformer_lens.model_bridge import TransformerBridge

    config = T.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=4096, vocab_size=50257)
    model = T.GPT2LMHeadModel(config).eval()
    tiny_models.randomise(model)
    model.save_pretrained(root / "gpt2_small")
    tiny_models._word_tokenizer().save_pretrained(root / "gpt2_small")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(str(root / "gpt2_small"), device="cpu")


class CheckTimer:
    """Wraps ``verify_layer`` in the engine and sums the time spent in it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.original = maps_module.verify_layer

    def __enter__(self) -> CheckTimer:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        maps_module.verify_layer = timed
        return self

    def __exit__(self, *exc: object) -> None:
        maps_module.verify_layer = self.original


def self_check(model, n: int, scopes, layers, repeats: int) -> dict[str, float]:
    toks = torch.randint(100, 50000, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=nm.hook_filter(model, scopes))
    nm.mixing_maps(model, cache, scopes, layers=layers)  # warm-up
    off, on, check = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        nm.mixing_maps(model, cache, scopes, layers=layers, verify=False)
        off.append(time.perf_counter() - start)
        with CheckTimer() as timer:
            start = time.perf_counter()
            nm.mixing_maps(model, cache, scopes, layers=layers, verify=True)
            on.append(time.perf_counter() - start)
        check.append(timer.seconds)
    result = {  # the fastest of the repeats: least disturbed by other load
        "maps, verify=False (s)": min(off),
        "maps, verify=True (s)": min(on),
        "check alone (s)": min(check),
    }
    base = result["maps, verify=False (s)"]
    result["check / maps"] = result["check alone (s)"] / base
    result["(verify=True − verify=False) / maps"] = (result["maps, verify=True (s)"] - base) / base
    return result


def generic_vs_closed(model, n: int, repeats: int) -> dict[str, float]:
    toks = torch.randint(7, 100, (1, n), generator=torch.Generator().manual_seed(1))
    adapter = nm.adapt(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=nm.hook_filter(model, "layer_n"))
    t = adapter.read(cache, 0, {r for r in adapter.sources if adapter.in_cache(cache, r, 0)})
    mask = torch.ones(1, n, dtype=torch.bool)
    stages = {"attnreslnff_n": Stage.FF}
    module = FFModule(forward=t.mlp.forward, description="opaque", width=t.mlp.W_in.shape[1])
    generic = dataclasses.replace(t, mlp=module)
    times = {"closed": [], "generic": []}
    for _ in range(repeats):
        for name, tensors in (("closed", t), ("generic", generic)):
            start = time.perf_counter()
            out = whole_layer.whole_layer_maps(tensors, t.pattern, mask, stages)
            times[name].append(time.perf_counter() - start)
            del out
    closed, slow = statistics.median(times["closed"]), statistics.median(times["generic"])
    return {"closed form (s)": closed, "generic (s)": slow, "generic / closed": slow / closed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--whole-layers", type=int, default=2)
    parser.add_argument("--generic-sizes", type=int, nargs="*", default=[16, 64])
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = gpt2_small(root)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"\n1. Self-check cost, GPT-2-small shape, N={args.size}, batch 1")
        rows = [
            ("attention-block scopes (5), 12 layers", ATTENTION, None),
            (f"layer_n, {args.whole_layers} layers", ("layer_n",), list(range(args.whole_layers))),
        ]
        for label, scopes, layers in rows:
            result = self_check(model, args.size, scopes, layers, args.repeats)
            print(f"  {label}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        print("\n2. Generic feed-forward path vs closed form, one layer (attnreslnff_n)")
        tiny = tiny_models.build(tiny_models.Case("gpt2", "raw"), root / "tiny")
        for n in args.generic_sizes:
            for label, m in (("tiny (d_model 32, d_mlp 64)", tiny), ("GPT-2-small shape", model)):
                result = generic_vs_closed(m, n, args.repeats)
                print(f"  {label}, N={n}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))


if __name__ == "__main__":
    main()
