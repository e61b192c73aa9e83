"""Command line: ``tl-normmix report`` (the HTML report) and ``tl-normmix summary`` (a table).

Both load the model (see ``tl_normmix.load_model`` for the accepted references), run it once with
only the hooks they need, and either write a self-contained HTML report or print the per-layer
summary of attention weights and value norms. Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

__all__ = ["main"]

MODEL_HELP = (
    "a packaged model (all-MiniLM-L6-v2, SmolLM2-135M), a local transformers folder, "
    "a .gguf file, or a Hugging Face hub name"
)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the input text")
    text.add_argument("--text-file", help="a file holding the input text")
    parser.add_argument("--layers", help="comma-separated layers (default: all)")
    parser.add_argument(
        "--compatibility-mode",
        action="store_true",
        help="TransformerLens 4.x: process weights (fold LN, centre) before computing",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tl-normmix", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="a self-contained HTML report of one text")
    _common(report)
    report.add_argument("--out", required=True, help="the HTML file to write")
    report.add_argument(
        "--scopes",
        help="comma-separated scopes (default: attn_w,attn_n,attnres_n,"
        "attnresln_n,layer_n, as the block allows)",
    )
    report.add_argument(
        "--truncate", action="store_true", help="keep the first n_ctx tokens of a longer text"
    )
    report.add_argument("--quiet", action="store_true", help="no progress bar")
    summary = commands.add_parser("summary", help="per-layer attention weight / value norm table")
    _common(summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return _report(args) if args.command == "report" else _summary(args)
    except (ValueError, LookupError, OSError, NotImplementedError, ImportError, MemoryError) as err:
        print(f"tl-normmix: error: {err}", file=sys.stderr)
        return 2


def _text(args: argparse.Namespace) -> str:
    if args.text_file is not None:
        with open(args.text_file, encoding="utf-8") as handle:
            text = handle.read()
    else:
        text = args.text
    from tl_normmix.render.report import check_text

    return check_text(text)


def _layers(args: argparse.Namespace) -> list[int] | None:
    if not args.layers:
        return None
    try:
        return [int(x) for x in args.layers.split(",")]
    except ValueError:
        raise ValueError(f"--layers {args.layers!r}: expected integers like 0,3,5.") from None


def _report(args: argparse.Namespace) -> int:
    import tl_normmix as nm
    from tl_normmix.render.report import build_report, check_output_path, tokenize, write_atomic

    start = time.perf_counter()
    out = check_output_path(args.out)  # before any work
    text = _text(args)
    layers = _layers(args)
    scopes = [s.strip() for s in args.scopes.split(",")] if args.scopes else None
    if not args.quiet:
        print(f"loading {args.model} ...", file=sys.stderr)
    model = nm.load_model(args.model, compatibility_mode=args.compatibility_mode)
    tokens = tokenize(model, text, truncate=args.truncate)
    document = build_report(model, tokens, scopes=scopes, layers=layers, progress=not args.quiet)
    write_atomic(out, document)
    size = out.stat().st_size / 2**20
    seconds = time.perf_counter() - start
    print(f"wrote {out} ({size:.1f} MiB, {tokens.shape[-1]} tokens) in {seconds:.1f} s")
    return 0


def _summary(args: argparse.Namespace) -> int:
    import torch

    import tl_normmix as nm
    from tl_normmix.summary import format_table, layer_summary

    text = _text(args)
    layers = _layers(args)
    model = nm.load_model(args.model, compatibility_mode=args.compatibility_mode)
    tokens = model.to_tokens(text)
    names = nm.hook_filter(model, "attn_w", value_norms=True)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    maps = nm.mixing_maps(model, cache, "attn_w", layers=layers, tokens=tokens, value_norms=True)
    spec = nm.adapt(model).spec
    print(
        f"model: {spec.model_name} ({spec.architecture}, {spec.block.layout.name} blocks, "
        f"TransformerLens {spec.tl_version}, {spec.convention} weights)"
    )
    print(f"tokens ({tokens.shape[-1]}): {' '.join(maps.str_tokens[0]) if maps.str_tokens else ''}")
    print(format_table(layer_summary(maps)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
