"""Benchmark: a per-head edge sweep for one receiver, tl_normmix against TransformerLens.

SmolLM2-135M (packaged, offline), one prompt (default: the IOI prompt, 15 tokens), receiver = the
last token, metric = log p(model's top-1 next token). Every (layer, head, source) edge is removed
alone:

* **tl_normmix**: ``nm.knock_out(model, tokens, nm.edges(heads="each"), metric)`` — many edits
  per forward (``--batch-size`` rows; default: a 512 MiB activation budget), each forward starting
  at the edited layer from the clean residual where that is exact;
* **TransformerLens**: ``transformer_lens.patching.generic_activation_patch`` with
  ``layer_head_dest_src_pos_pattern_patch_setter`` patching a zero into ``hook_pattern`` cell by
  cell (its "pattern dest-src" sweep restricted to the same cells): one forward per cell. On
  SmolLM2 (Llama bridge) the pattern hook is live, so zeroing a cell is the same intervention.

Both in this process, one after the other; wall-clock time (``time.perf_counter``), the largest
effect difference, and the peak resident memory of each (``ru_maxrss`` after resetting it via
``/proc/self/clear_refs``).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_patching.py [--prompt TEXT] [--batch-size N]
"""

from __future__ import annotations

import argparse
import resource
import time

import pandas as pd
import torch

import tl_normmix as nm

IOI = "When Mary and John went to the store, John gave a drink to"


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default=IOI)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()
    from transformer_lens.patching import (
        generic_activation_patch,
        layer_head_dest_src_pos_pattern_patch_setter,
    )

    model = nm.load_model("SmolLM2-135M")
    toks = model.to_tokens(args.prompt)
    n = toks.shape[1]
    with torch.no_grad():
        clean_logits = model(toks)
    top = int(clean_logits[0, -1].argmax())

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1].log_softmax(-1)[:, top]

    nm.knock_out(model, toks, nm.edges(layers=[0], heads=[0], sources=[0]), metric)  # warm-up

    reset_peak()
    base = rss_mib()
    start = time.perf_counter()
    ko = nm.knock_out(model, toks, nm.edges(heads="each"), metric, batch_size=args.batch_size)
    ours = time.perf_counter() - start
    ours_peak = peak_mib() - base

    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, zero = model.run_with_cache(toks, names_filter=lambda name: name in names)
    for name in names:
        zero.cache_dict[name] = torch.zeros_like(zero[name])
    index = pd.DataFrame(
        [(e.layer, e.head, n - 1, e.source) for e in ko.edges],
        columns=["layer", "head_index", "dest_pos", "src_pos"],
    )

    def scalar(logits: torch.Tensor) -> torch.Tensor:
        return metric(logits)[0]

    reset_peak()
    base = rss_mib()
    start = time.perf_counter()
    with torch.no_grad():
        values = generic_activation_patch(
            model,
            toks,
            zero,
            scalar,
            layer_head_dest_src_pos_pattern_patch_setter,
            "pattern",
            index_df=index,
        )
    theirs = time.perf_counter() - start
    theirs_peak = peak_mib() - base
    tl_effect = values.flatten().cpu() - ko.clean[0]
    difference = float((tl_effect - ko.effect[:, 0]).abs().max())
    rows = args.batch_size or "default (512 MiB budget)"
    print(
        f"SmolLM2-135M, {n} tokens, {len(ko.edges)} per-head edges ({model.cfg.n_layers} layers × "
        f"{model.cfg.n_heads} heads × {n} sources), receiver = last token, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("| method | forwards | time | peak extra memory |")
    print("|---|---|---|---|")
    print(
        f"| tl_normmix knock_out (batch size {rows}) | {ko.n_forwards} | {ours:.1f} s | "
        f"{ours_peak:.0f} MiB |"
    )
    print(
        f"| TransformerLens generic_activation_patch | {len(index)} | {theirs:.1f} s | "
        f"{theirs_peak:.0f} MiB |"
    )
    print(
        f"speed-up {theirs / ours:.1f}×; largest |effect difference| {difference:.2e} "
        f"(effects up to {float(ko.effect.abs().max()):.3f})"
    )


if __name__ == "__main__":
    main()
