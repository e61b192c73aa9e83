"""Command line: ``tl-normmix report`` (the HTML report), ``tl-normmix patch`` (maps beside exact
edge interventions, HTML), ``tl-normmix summary`` (a table) and ``tl-normmix corpus analyse |
status | reduce | report`` (the corpus analyses of METHODS §6).

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
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--chunk-size", type=int, default=256, help="sentences per committed chunk")
    run.add_argument("--max-sentences", type=int, help="only the first N sentences")
    run.add_argument("--engine", choices=("local", "ray"), default="local")
    run.add_argument(
        "--shard", help="K/N: only chunks with id %% N == K (SLURM arrays); then reduce"
    )
    run.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    run.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    run.add_argument("--truncate", action="store_true", help="cut sentences longer than n_ctx")
    run.add_argument("--top-k", type=int, default=5, help="exemplar sentences kept per head")
    run.add_argument("--restart", action="store_true", help="discard DIR's parts and start over")
    run.add_argument("--actors", type=int, default=1, help="--engine ray: model actors")
    run.add_argument("--cpus-per-actor", type=float, default=1)
    run.add_argument("--gpus-per-actor", type=float, default=0)
    run.add_argument("--address", help="--engine ray: the cluster (default: start a local one)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    status = sub.add_parser("status", help="chunks done / total, fingerprint")
    status.add_argument("dir")
    reduce = sub.add_parser("reduce", help="merge the chunks into the summary (idempotent)")
    reduce.add_argument("dir")
    page = sub.add_parser("report", help="the run's offline HTML report")
    page.add_argument("dir")
    page.add_argument("--out", required=True, help="the HTML file to write")


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
    from tl_normmix.render.report import check_text

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
    from tl_normmix.render.report import build_report, check_output_path, tokenize, write_atomic

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
    from tl_normmix.render.patch_report import build_patch_report
    from tl_normmix.render.report import check_output_path, tokenize, write_atomic

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
        from tl_normmix.render.corpus_report import build_corpus_report
        from tl_normmix.render.report import check_output_path, write_atomic

        out = check_output_path(args.out)
        write_atomic(out, build_corpus_report(corpus.load(args.dir)))
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
        return 0
    start = time.perf_counter()
    scopes = _scopes(args.scopes) or []
    result: corpus.CorpusResult | None = corpus.analyse(
        args.model,
        args.conllu,
        args.out,
        scopes,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        max_sentences=args.max_sentences,
        engine=args.engine,
        shard=args.shard,
        device=args.device,
        dtype=args.dtype,
        truncate=args.truncate,
        top_k=args.top_k,
        restart=args.restart,
        progress=not args.quiet,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        address=args.address,
    )
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
