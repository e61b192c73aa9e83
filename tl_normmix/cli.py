"""Command line: ``tl-normmix summary --model MODEL --text TEXT``.

Loads the model (see ``tl_normmix.load_model`` for the accepted references), runs it once with
only the hooks it needs, and prints the per-layer summary of attention weights and value norms.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tl-normmix", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary", help="per-layer attention weight / value norm table")
    summary.add_argument(
        "--model",
        required=True,
        help="all-MiniLM-L6-v2, SmolLM2-135M, a local folder, a .gguf file or a hub name",
    )
    text = summary.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the input text")
    text.add_argument("--text-file", help="a file holding the input text")
    summary.add_argument("--layers", help="comma-separated layers (default: all)")
    summary.add_argument(
        "--compatibility-mode",
        action="store_true",
        help="TransformerLens 4.x: process weights (fold LN, centre) before computing",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return _summary(args)
    except (ValueError, LookupError, OSError, NotImplementedError) as err:
        print(f"tl-normmix: error: {err}", file=sys.stderr)
        return 2


def _summary(args: argparse.Namespace) -> int:
    import torch

    import tl_normmix as nm
    from tl_normmix.summary import format_table, layer_summary

    if args.text_file is not None:
        with open(args.text_file, encoding="utf-8") as handle:
            text = handle.read()
    else:
        text = args.text
    if not text.strip():
        raise ValueError("The text is empty.")
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    model = nm.load_model(args.model, compatibility_mode=args.compatibility_mode)
    tokens = model.to_tokens(text)
    names = nm.hook_filter(model, "attn_w", value_norms=True)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    maps = nm.mixing_maps(model, cache, "attn_w", layers=layers, tokens=tokens, value_norms=True)
    spec = nm.adapt(model).spec
    print(
        f"model: {spec.model_name} ({spec.architecture}, {spec.block.kind.value} blocks, "
        f"TransformerLens {spec.tl_version}, {spec.convention} weights)"
    )
    print(f"tokens ({tokens.shape[-1]}): {' '.join(maps.str_tokens[0]) if maps.str_tokens else ''}")
    print(format_table(layer_summary(maps)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
