"""The command line: ``tl-normmix report | patch | summary | corpus``.

Every subcommand that runs a model loads it (``tl_normmix.load_model``: a packaged name, a local
folder, a ``.gguf`` file or a hub name) on ``--device`` in ``--dtype``. Exit status: 0 done, 1 a
runtime error (one line naming the fix, no traceback), 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
import typing
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["main", "parser"]

DESCRIPTION = (
    "Context-mixing maps of TransformerLens models. 'report' writes the HTML report of one text "
    "(maps by weight and by norm, through the residual, the layer norm and the feed-forward "
    "block, and the peers' methods); 'patch' puts the maps beside exact edge interventions; "
    "'summary' prints a per-layer table; 'corpus' runs Clark et al. and Vig & Belinkov's "
    "analyses over CoNLL-U treebanks (analyse, status, reduce, report)."
)

MODEL_HELP = (
    "a packaged model (all-MiniLM-L6-v2, SmolLM2-135M), a local transformers folder, "
    "a .gguf file, or a Hugging Face hub name"
)
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = "auto, cpu, cuda, cuda:N, mps"


class CommandError(Exception):
    """A runtime error the command line reports in one line (exit status 1)."""


def _version() -> str:
    from tl_normmix import __version__

    return __version__


def _scope_list(text: str) -> list[str]:
    """``--scopes a,b`` → ``["a", "b"]``, each a registered scope."""
    from tl_normmix.maps.scopes import SCOPES

    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SCOPES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scope(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SCOPES)}"
        )
    return names


def _layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers like 0,3,5") from None


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {DEVICES}")
    return text


def _scope_help(default: str) -> str:
    from tl_normmix.maps.scopes import SCOPES

    return f"comma-separated scopes from {', '.join(SCOPES)} (default: {default})"


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument(
        "--device", type=_device, default="auto", help=f"where the model runs: {DEVICES}"
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the model's dtype")
    parser.add_argument(
        "--compatibility-mode",
        action="store_true",
        help="TransformerLens 4.x: process the weights (fold layer norms, centre) first",
    )


def _text_options(parser: argparse.ArgumentParser) -> None:
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the input text")
    text.add_argument("--text-file", help="a file holding the input text")
    parser.add_argument("--layers", type=_layer_list, help="comma-separated layers (default: all)")


def parser() -> argparse.ArgumentParser:
    """The command line's parser (its help is the docs' CLI reference)."""
    top = argparse.ArgumentParser(prog="tl-normmix", description=DESCRIPTION)
    top.add_argument("--version", action="version", version=f"tl-normmix {_version()}")
    commands = top.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report",
        help="a self-contained HTML report of one text",
        description="Writes one offline HTML page: the maps of the chosen scopes per layer, the "
        "per-head maps by weight and by norm, value norms, plots and the peers' methods.",
    )
    _model_options(report)
    _text_options(report)
    report.add_argument("--out", required=True, help="the HTML file to write")
    report.add_argument(
        "--scopes",
        type=_scope_list,
        help=_scope_help("attn_w,attn_n,attnres_n,attnresln_n,layer_n, as the block allows"),
    )
    report.add_argument(
        "--truncate", action="store_true", help="keep the first n_ctx tokens of a longer text"
    )
    report.add_argument(
        "--target",
        help="add an attribution section: the last token's logit of this token (a single-token "
        "string, e.g. ' Mary', or an id) split over layers, heads and sources",
    )
    report.add_argument("--foil", help="with --target: split the logit difference target − foil")
    report.add_argument("--quiet", action="store_true", help="no progress bar")
    summary = commands.add_parser(
        "summary",
        help="a per-layer table of attention weights and value norms",
        description="Prints, per layer, the mixing ratio by weight, the most attended token and "
        "its value norm against the others'.",
    )
    _model_options(summary)
    _text_options(summary)
    patch = commands.add_parser(
        "patch",
        help="maps beside exact edge interventions for one text (offline HTML)",
        description="Writes one offline HTML page: how well each map ranks the exact effects of "
        "removing each edge into the last token, faithfulness curves, and the effects beside "
        "the maps per layer.",
    )
    _model_options(patch)
    _text_options(patch)
    patch.add_argument("--out", required=True, help="the HTML file to write")
    patch.add_argument("--scopes", type=_scope_list, help=_scope_help("attn_w,attn_n,attnres_n"))
    patch.add_argument("--quiet", action="store_true", help="no progress bar")
    _corpus_parser(commands)
    return top


def _corpus_parser(commands: Any) -> None:
    corpus = commands.add_parser(
        "corpus",
        help="Clark / Vig & Belinkov analyses over CoNLL-U files",
        description="Runs the corpus analyses into a run folder that can be resumed, sharded "
        "and reduced, and writes its report.",
    )
    sub = corpus.add_subparsers(dest="corpus_command", required=True)
    run = sub.add_parser("analyse", help="run (or resume) the analyses into DIR")
    run.add_argument("--model", required=True, help=MODEL_HELP)
    run.add_argument("--conllu", required=True, nargs="+", help="CoNLL-U files, in order")
    run.add_argument("--out", required=True, help="the run directory (resumed if it exists)")
    run.add_argument(
        "--scopes", type=_scope_list, default="attn_w,attn_n", help=_scope_help("attn_w,attn_n")
    )
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
            action = "store_false" if f.default else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, help=help_text)
            continue
        kind = hints[f.name]
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        scalar = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        convert = _device if f.name == "device" else str if choices else scalar
        parser.add_argument(
            flag, dest=f.name, type=convert, choices=choices, default=f.default, help=help_text
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    command: dict[str, Callable[[argparse.Namespace], int]] = {
        "report": _report,
        "summary": _summary,
        "patch": _patch,
        "corpus": _corpus,
    }
    resumable = args.command == "corpus" and args.corpus_command == "analyse"
    try:
        return command[args.command](args)
    except KeyboardInterrupt:
        kept = (
            "; the chunks committed so far are kept: run the same command again to resume"
            if resumable
            else ""
        )
        print(f"tl-normmix: interrupted{kept}.", file=sys.stderr)
        return 130
    except Exception as err:  # every runtime error: one line, the fix named, no traceback
        message = _runtime_message(err, args)
        if message is None:
            raise
        print(f"tl-normmix: error: {message}", file=sys.stderr)
        return 1


def _runtime_message(err: Exception, args: argparse.Namespace) -> str | None:
    """The one line for a runtime error (None: a bug, shown with its traceback)."""
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        lower = "--batch-size" if args.command == "corpus" else "--layers or a shorter text"
        return (
            f"out of GPU memory ({str(err).splitlines()[0]}); lower {lower}, or use "
            "--dtype bfloat16 or --device cpu."
        )
    expected = (
        CommandError,
        ValueError,
        LookupError,
        OSError,
        NotImplementedError,
        ImportError,
        MemoryError,
        TypeError,
    )
    if isinstance(err, expected):
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


def _load(args: argparse.Namespace) -> Any:
    import torch

    import tl_normmix as nm
    from tl_normmix.corpus.chunk import resolve_device

    return nm.load_model(
        args.model,
        dtype=getattr(torch, args.dtype),
        device=resolve_device(args.device),
        compatibility_mode=args.compatibility_mode,
    )


def _text(args: argparse.Namespace) -> str:
    from tl_normmix.reports.io import check_text

    if args.text_file is not None:
        with open(args.text_file, encoding="utf-8") as handle:
            return check_text(handle.read())
    return check_text(args.text)


def _token_argument(value: str | None) -> str | int | None:
    """A token given on the command line: an id if it is a number, else the string itself."""
    if value is None:
        return None
    return int(value) if value.strip().isdigit() else value


def _report(args: argparse.Namespace) -> int:
    from tl_normmix.reports.io import check_output_path, tokenize, write_atomic
    from tl_normmix.reports.report import build_report

    start = time.perf_counter()
    out = check_output_path(args.out)  # before any work
    text = _text(args)
    if not args.quiet:
        print(f"loading {args.model} ...", file=sys.stderr)
    model = _load(args)
    tokens = tokenize(model, text, truncate=args.truncate)
    document = build_report(
        model,
        tokens,
        scopes=args.scopes,
        layers=args.layers,
        progress=not args.quiet,
        target=_token_argument(args.target),
        foil=_token_argument(args.foil),
    )
    write_atomic(out, document)
    size = out.stat().st_size / 2**20
    seconds = time.perf_counter() - start
    print(f"wrote {out} ({size:.1f} MiB, {tokens.shape[-1]} tokens) in {seconds:.1f} s")
    return 0


def _patch(args: argparse.Namespace) -> int:
    from tl_normmix.reports.io import check_output_path, tokenize, write_atomic
    from tl_normmix.reports.patch_report import build_patch_report

    start = time.perf_counter()
    out = check_output_path(args.out)  # before any work
    text = _text(args)
    model = _load(args)
    tokens = tokenize(model, text)
    options: dict[str, Any] = {"progress": not args.quiet}
    if args.scopes:
        options["scopes"] = args.scopes
    write_atomic(out, build_patch_report(model, tokens, **options))
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
    scopes = args.scopes if isinstance(args.scopes, list) else _scope_list(args.scopes)
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
    model = _load(args)
    tokens = model.to_tokens(text)
    names = nm.hook_filter(model, "attn_w", value_norms=True)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    maps = nm.mixing_maps(
        model, cache, "attn_w", layers=args.layers, tokens=tokens, value_norms=True
    )
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
