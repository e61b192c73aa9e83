"""``nm.corpus.analyse``: plan, fingerprint, compute the chunks not yet done, reduce.

Exactly-once and resumable whatever happens: the plan (fixed chunks of sentence ids) and the
fingerprint go into ``manifest.json``, created by the first process; every other (a resume,
another shard started at the same moment, another engine) checks its fingerprint against it and
computes only the chunks without an ``agg`` part, checked again just before each chunk. Commits
are locked per chunk (``store``): concurrent processes never commit one twice nor delete each
other's files. When every chunk is done, ``reduce`` writes the summary (idempotent).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tl_normmix.corpus.chunk import ChunkAnalyser, ModelSpec
from tl_normmix.corpus.config import CorpusConfig
from tl_normmix.corpus.engines import run_local, run_ray
from tl_normmix.corpus.plan import Plan, fingerprint, make_plan, mismatch
from tl_normmix.corpus.reduce import reduce
from tl_normmix.corpus.results import CorpusResult
from tl_normmix.corpus.store import Store, Tables

__all__ = ["analyse", "status"]

Files = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def analyse(
    model_or_name: Any,
    conllu_files: Files,
    out: str | os.PathLike[str],
    scopes: Sequence[str] = ("attn_w", "attn_n"),
    config: CorpusConfig | None = None,
) -> CorpusResult | None:
    """Run the corpus statistics (docs: guides, corpus analyses) over ``conllu_files`` into
    ``out``.

    ``model_or_name`` is a live model (local engine only) or a reference ``load_model`` accepts
    (a name or a path: what workers and shards build their model from); ``config`` how the run
    is computed (``CorpusConfig()`` by default). Returns the reduced ``CorpusResult`` once every
    chunk is done, else None (other shards still to run). ``config.restart`` deletes the run's
    parts first; otherwise a run resumes when its fingerprint matches the manifest and is
    refused when it does not.
    """
    config = config or CorpusConfig()
    files = [conllu_files] if isinstance(conllu_files, (str, os.PathLike)) else list(conllu_files)
    plan = make_plan(files, config.chunk_size, config.max_sentences)  # parse errors first
    spec, model, model_ref = _model(model_or_name, config)
    options: dict[str, Any] = {
        "scopes": tuple(scopes),
        "batch_size": config.batch_size,
        "top_k": config.top_k,
        "truncate": config.truncate,
        "tokenization": config.tokenization,
        "alignment": config.alignment,
    }
    analyser = ChunkAnalyser(model, **options)  # refuses models without a fast tokenizer
    store = _open(out, config, fingerprint(model, model_ref, plan, analyser.scopes, config), plan)
    todo, bar = _todo(store, plan, config)

    def commit(chunk: int, tables: Tables) -> None:
        store.commit(chunk, tables)  # a chunk another process committed meanwhile is left as it is
        if bar is not None:
            bar.update(plan.chunk_sizes()[chunk])

    try:
        if config.engine == "local":  # each chunk checked again just before it is computed
            fresh = ((c, sentences) for c, sentences in todo if not store.is_done(c))
            run_local(analyser, fresh, commit)
        else:
            assert spec is not None
            del analyser, model  # the workers build their own
            run_ray(
                spec,
                options,
                todo,
                commit,
                actors=config.actors,
                cpus_per_actor=config.cpus_per_actor,
                gpus_per_actor=config.gpus_per_actor,
                address=config.address,
            )
    finally:
        if bar is not None:
            bar.close()
    if len(store.done()) < plan.n_chunks:
        return None
    return reduce(store.root)


def _model(model_or_name: Any, config: CorpusConfig) -> tuple[ModelSpec | None, Any, str]:
    """``(spec, model, reference)``: a name or path is built from its spec (workers rebuild
    it); a live model runs locally only."""
    if isinstance(model_or_name, (str, os.PathLike)):
        spec = ModelSpec(str(model_or_name), config.device, config.dtype)
        return spec, spec.build(), str(model_or_name)
    if config.engine == "ray":
        raise ValueError(
            "--engine ray builds the model in every worker: pass a model name or path, not "
            "a model object (TransformerLens models do not pickle)."
        )
    model = model_or_name
    return None, model, str(getattr(model.cfg, "model_name", type(model).__name__))


def _open(
    out: str | os.PathLike[str], config: CorpusConfig, fp: dict[str, Any], plan: Plan
) -> Store:
    """The run's store: restarted if asked, its manifest written on the first run and checked
    against the fingerprint on every later one."""
    store = Store(out)
    if config.restart and store.root.exists():
        for folder in ("parts", "summary"):
            shutil.rmtree(store.root / folder, ignore_errors=True)
        store.manifest_path.unlink(missing_ok=True)
    manifest = {
        "fingerprint": fp,
        "chunks": plan.n_chunks,
        "chunk_sentences": plan.chunk_sizes(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if not store.create_manifest(manifest):  # another process created it: same run?
        differ = mismatch(store.read_manifest()["fingerprint"], fp)
        if differ:
            raise ValueError(
                f"{store.root} holds a run with another fingerprint (differs in: "
                f"{', '.join(differ)}); use a new --out, or --restart to discard it."
            )
    store.sweep()  # only files whose writer is gone: other shards keep theirs
    return store


def _todo(store: Store, plan: Plan, config: CorpusConfig) -> tuple[list[Any], Any]:
    """This run's chunks not yet done (of its shard), and a progress bar over their
    sentences that starts at the sentences already done."""
    shard = config.shard_of
    mine = [c for c in range(plan.n_chunks) if shard is None or c % shard[1] == shard[0]]
    done = store.done()
    todo = [(c, plan.chunk(c)) for c in mine if c not in done]
    sizes = plan.chunk_sizes()
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        total = sum(sizes[c] for c in mine)
        initial = sum(sizes[c] for c in mine if c in done)
        bar = tqdm(total=total, initial=initial, unit="sentence", desc="corpus")
    return todo, bar


def status(out: str | os.PathLike[str]) -> dict[str, Any]:
    """Chunks done / total, sentences done / total, orphaned temporary files, the fingerprint."""
    store = Store(out)
    manifest = store.read_manifest()
    done = store.done()
    sizes = manifest["chunk_sentences"]
    return {
        "out": str(Path(out)),
        "chunks_done": len(done),
        "chunks": manifest["chunks"],
        "sentences_done": sum(sizes[c] for c in done if c < len(sizes)),
        "sentences": sum(sizes),
        "orphans": len(store.orphans()),
        "reduced": store.summary("agg").exists(),
        "fingerprint": manifest["fingerprint"],
    }
