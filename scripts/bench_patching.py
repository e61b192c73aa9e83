"""Benchmark: a per-head edge sweep for one receiver, tl_normmix against TransformerLens.

SmolLM2-135M (packaged, offline), one prompt (default: the IOI prompt, 15 tokens), receiver = the
last token, metric = log p(model's top-1 next token). Every (layer, head, source) edge is removed
alone:

* **tl_normmix**: ``nm.knock_out(model, tokens, nm.edges(heads="each"), metric)`` — many edits
  per forward (``--batch-size`` rows; default: a 512 MiB activation budget), each forward running
  only the last position from the clean keys and values of the others (``KnockOut.shortcut``);
* **TransformerLens**: ``transformer_lens.patching.generic_activation_patch`` with
  ``layer_head_dest_src_pos_pattern_patch_setter`` patching a zero into ``hook_pattern`` cell by
  cell (its "pattern dest-src" sweep restricted to the same cells): one forward per cell. On
  SmolLM2 (Llama bridge) the pattern hook is live, so zeroing a cell is the same intervention.

Both in this process, one after the other; wall-clock time (``time.perf_counter``), the largest
effect difference, and the peak memory of each above what was in use before it
(``scripts/measure.py``: resident memory on a CPU, the device's peak allocation on CUDA).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_patching.py [--prompt TEXT] [--batch-size N]
    .venv/bin/python scripts/bench_patching.py --random 15 --device cuda   # a GPU machine
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from measure import measure
from random_models import random_model

import tl_normmix as nm

IOI = "When Mary and John went to the store, John gave a drink to"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default=IOI)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--random",
        type=int,
        metavar="N",
        help="random weights of SmolLM2's shape and N random token ids (a GPU machine has no "
        "packaged model)",
    )
    args = parser.parse_args()
    from transformer_lens.patching import (
        generic_activation_patch,
        layer_head_dest_src_pos_pattern_patch_setter,
    )

    dtype = getattr(torch, args.dtype)
    if args.random:
        model = random_model("smollm2", max(args.random, 64), args.device, dtype)
        toks = torch.randint(2, 100, (1, args.random), generator=torch.Generator().manual_seed(0))
        toks = toks.to(args.device)
    else:
        model = nm.load_model("SmolLM2-135M", device=args.device, dtype=dtype)
        toks = model.to_tokens(args.prompt)
    n = toks.shape[1]
    with torch.no_grad():
        clean_logits = model(toks)
    top = int(clean_logits[0, -1].argmax())

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1].log_softmax(-1)[:, top]

    nm.knock_out(model, toks, nm.edges(layers=[0], heads=[0], sources=[0]), metric)  # warm-up

    ours, ours_peak, ko = measure(
        lambda: nm.knock_out(
            model, toks, nm.edges(heads="each"), metric, batch_size=args.batch_size
        ),
        args.device,
    )

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

    def theirs_run() -> torch.Tensor:
        with torch.no_grad():
            return generic_activation_patch(
                model,
                toks,
                zero,
                scalar,
                layer_head_dest_src_pos_pattern_patch_setter,
                "pattern",
                index_df=index,
            )

    theirs, theirs_peak, values = measure(theirs_run, args.device)
    tl_effect = values.flatten().cpu() - ko.clean[0]
    difference = float((tl_effect - ko.effect[:, 0]).abs().max())
    rows = args.batch_size or "default (512 MiB budget)"
    print(
        f"SmolLM2-135M{' shape, random weights' if args.random else ''} ({args.dtype}, "
        f"{args.device}), {n} tokens, {len(ko.edges)} per-head edges "
        f"({model.cfg.n_layers} layers × {model.cfg.n_heads} heads × {n} sources), "
        "receiver = last token, "
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
