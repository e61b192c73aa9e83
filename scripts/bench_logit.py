"""Time ``nm.logit_attribution`` (and its trackers) against the model's forward, same process.

SmolLM2-135M (packaged) at ``--tokens`` tokens of EWT text, target = the model's top-1 next token at
the last position: the plain forward, ``run_with_cache`` with the hooks it reads, the attribution
from the cache, ``tracked("alti")`` and ``tracked("exact")``. Median of ``--repeat`` runs after a
warm-up.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_logit.py --tokens 256
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_logit.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import tl_normmix as nm

EWT = Path(__file__).resolve().parents[2] / "shared/data/ud/UD_English-EWT/en_ewt-ud-dev.conllu"


def text_of(n_tokens: int, model) -> torch.Tensor:
    words = []
    for line in EWT.read_text(encoding="utf-8").splitlines():
        if line.startswith("# text = "):
            words.append(line.removeprefix("# text = "))
        if len(words) > n_tokens:
            break
    tokens = model.to_tokens(" ".join(words))
    return tokens[:, :n_tokens]


def timed(fn, repeat: int) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeat):
        _sync()
        start = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--exact", action="store_true", help="also time tracked('exact')")
    parser.add_argument("--device", default=None, help="e.g. cuda (default: the CPU)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = nm.load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    tokens = text_of(args.tokens, model).to(next(model.parameters()).device)
    top = int(model(tokens)[0, -1].argmax())
    names = nm.hook_filter(model, "layer_n", verify=False)
    forward, _ = timed(lambda: model(tokens), args.repeat)
    cached, (_, cache) = timed(
        lambda: model.run_with_cache(tokens, names_filter=names), args.repeat
    )
    attribution, la = timed(lambda: nm.logit_attribution(model, cache, top), args.repeat)

    def alti():
        fresh = nm.logit_attribution(model, cache, top)
        return fresh.tracked("alti")

    tracked, _ = timed(alti, args.repeat)
    where = args.device or "cpu"
    print(
        f"{args.model}, {tokens.shape[1]} tokens, {where}, {args.dtype}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print("| step | seconds | × forward |")
    print("|---|---|---|")
    rows = [
        ("forward", forward),
        ("run_with_cache (hooks of layer_n)", cached),
        ("logit_attribution (from the cache)", attribution),
        ("logit_attribution + tracked('alti')", tracked),
    ]
    if args.exact:
        exact, _ = timed(lambda: nm.logit_attribution(model, cache, top).tracked("exact"), 1)
        rows.append(("logit_attribution + tracked('exact')", exact))
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {seconds / forward:.2f} |")
    print(f"\nresidual |total − actual| / scale: {float(la.residual.max()):.1e}")


if __name__ == "__main__":
    main()
