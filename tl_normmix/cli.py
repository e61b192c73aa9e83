"""Command line: ``tl-normmix report`` (the HTML report), ``tl-normmix patch`` (maps beside exact
edge interventions, HTML), ``tl-normmix summary`` (a table) and ``tl-normmix corpus analyse |
status | reduce | report`` (the corpus analyses of METHODS §6).

Both load the model (see ``tl_normmix.load_model`` for the accepted references), run it once with
only the hooks they need, and either write a self-contained HTML report or print the per-layer
summary of attention weights and value norms. Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import typing
from collections.abc import Sequence
from typing import Any

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
    patch = commands.add_parser(
        "patch", help="maps beside exact edge interventions for one text (offline HTML)"
    )
    _common(patch)
    patch.add_argument("--out", required=True, help="the HTML file to write")
    patch.add_argument(
        "--scopes", help="comma-separated scopes to compare (default: attn_w,attn_n,attnres_n)"
    )
    _corpus_parser(commands)
    return parser


def _corpus_parser(commands: Any) -> None:
    corpus = commands.add_parser(
        "corpus", help="Clark / Vig & Belinkov analyses over CoNLL-U files"
    )
    sub = corpus.add_subparsers(dest="corpus_command", required=True)
    run = sub.add_parser("analyse", help="run (or resume) the analyses into DIR")
    run.add_argument("--model", required=True, help=MODEL_HELP)
    run.add_argument("--conllu", required=True, nargs="+", help="CoNLL-U files, in order")
    run.add_argument("--out", required=True, help="the run directory (resumed if it exists)")
    run.add_argument("--scopes", default="attn_w,attn_n", help="comma-separated scopes")
    _config_options(run)
    status = sub.add_parser("status", help="chunks done / total, fingerprint")
    status.add_argument("dir")
    reduce = sub.add_parser("reduce", help="merge the chunks into the summary (idempotent)")
    reduce.add_argument("dir")
    page = sub.add_parser("report", help="the run's offline HTML report")
    page.add_argument("dir")
    page.add_argument("--out", required=True, help="the HTML file to write")


def _config_options(parser: argparse.ArgumentParser) -> None:
    """One option per ``CorpusConfig`` field: flag, type, choices and help from the field."""
    from tl_normmix.corpus.config import CorpusConfig

    hints = typing.get_type_hints(CorpusConfig)
    for f in dataclasses.fields(CorpusConfig):
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if hints[f.name] is bool:  # a switch that flips the default
            parser.add_argument(
                flag,
                dest=f.name,
                action="store_false" if f.default else "store_true",
                help=help_text,
            )
            continue
        kind = hints[f.name]
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        scalar = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        parser.add_argument(
            flag,
            dest=f.name,
            type=str if choices else scalar,
            choices=choices,
            default=f.default,
            help=help_text,
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        command = {"report": _report, "summary": _summary, "patch": _patch, "corpus": _corpus}
        return command[args.command](args)
    except KeyboardInterrupt:
        print(
            "tl-normmix: interrupted; the chunks committed so far are kept: run the same "
            "command again to resume.",
            file=sys.stderr,
        )
        return 130
    except (ValueError, LookupError, OSError, NotImplementedError, ImportError, MemoryError) as err:
        print(f"tl-normmix: error: {err}", file=sys.stderr)
        return 2


def _text(args: argparse.Namespace) -> str:
    if args.text_file is not None:
        with open(args.text_file, encoding="utf-8") as handle:
            text = handle.read()
    else:
        text = args.text
    from tl_normmix.reports.io import check_text

    return check_text(text)


def _scopes(text: str | None) -> list[str] | None:
    """``--scopes a,b`` → ``["a", "b"]``; None when not given."""
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _layers(args: argparse.Namespace) -> list[int] | None:
    if not args.layers:
        return None
    try:
        return [int(x) for x in args.layers.split(",")]
    except ValueError:
        raise ValueError(f"--layers {args.layers!r}: expected integers like 0,3,5.") from None


def _report(args: argparse.Namespace) -> int:
    import tl_normmix as nm
    from tl_normmix.reports.io import check_output_path, tokenize, write_atomic
    from tl_normmix.reports.report import build_report

    start = time.perf_counter()
    out = check_output_path(args.out)  # before any work
    text = _text(args)
    layers = _layers(args)
    scopes = _scopes(args.scopes)
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


def _patch(args: argparse.Namespace) -> int:
    import tl_normmix as nm
    from tl_normmix.reports.io import check_output_path, tokenize, write_atomic
    from tl_normmix.reports.patch_report import build_patch_report

    start = time.perf_counter()
    out = check_output_path(args.out)  # before any work
    text = _text(args)
    scopes = _scopes(args.scopes)
    model = nm.load_model(args.model, compatibility_mode=args.compatibility_mode)
    tokens = tokenize(model, text)
    page = (
        build_patch_report(model, tokens, scopes=scopes)
        if scopes
        else build_patch_report(model, tokens)
    )
    write_atomic(out, page)
    size = out.stat().st_size / 2**20
    seconds = time.perf_counter() - start
    print(f"wrote {out} ({size:.1f} MiB, {tokens.shape[-1]} tokens) in {seconds:.1f} s")
    return 0


def _corpus(args: argparse.Namespace) -> int:
    import json

    from tl_normmix import corpus

    if args.corpus_command == "status":
        state = corpus.status(args.dir)
        print(
            f"{state['out']}: {state['chunks_done']} / {state['chunks']} chunks, "
            f"{state['sentences_done']} / {state['sentences']} sentences done"
            + ("; reduced" if state["reduced"] else "")
            + (f"; {state['orphans']} orphaned temporary files" if state["orphans"] else "")
        )
        print(json.dumps(state["fingerprint"], indent=1, sort_keys=True))
        return 0
    if args.corpus_command == "reduce":
        reduced = corpus.reduce(args.dir)
        print(
            f"reduced {args.dir}: "
            + ", ".join(f"{r.sentences} {r.status}" for r in reduced.summary().itertuples())
        )
        return 0
    if args.corpus_command == "report":
        from tl_normmix.reports.corpus_report import build_corpus_report
        from tl_normmix.reports.io import check_output_path, write_atomic

        out = check_output_path(args.out)
        write_atomic(out, build_corpus_report(corpus.load(args.dir)))
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
        return 0
    start = time.perf_counter()
    scopes = _scopes(args.scopes) or []
    config = corpus.CorpusConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(corpus.CorpusConfig)}
    )
    result = corpus.analyse(args.model, args.conllu, args.out, scopes, config)
    seconds = time.perf_counter() - start
    state = corpus.status(args.out)
    if result is None:
        print(
            f"{args.out}: {state['chunks_done']} / {state['chunks']} chunks done in "
            f"{seconds:.1f} s; the other shards remain (then `tl-normmix corpus reduce`)."
        )
    else:
        counts = ", ".join(f"{r.sentences} {r.status}" for r in result.summary().itertuples())
        print(f"{args.out}: done in {seconds:.1f} s ({counts})")
    return 0


def _summary(args: argparse.Namespace) -> int:
    import torch

    import tl_normmix as nm
    from tl_normmix.analysis.summary import format_table, layer_summary

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
