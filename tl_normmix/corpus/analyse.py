"""``nm.corpus.analyse``: plan, fingerprint, compute the chunks not yet done, reduce.

Exactly-once and resumable whatever happens: the plan (fixed chunks of sentence ids) and the
fingerprint are written to ``manifest.json`` on the first run; every later run (a resume, another
shard, another engine) checks its fingerprint against it and computes only the chunks without an
``agg`` part. When every chunk is done, ``reduce`` writes the summary (idempotent).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tl_normmix.corpus.chunk import ChunkAnalyser, ModelSpec
from tl_normmix.corpus.engines import run_local, run_ray
from tl_normmix.corpus.plan import fingerprint, make_plan, mismatch
from tl_normmix.corpus.reduce import reduce
from tl_normmix.corpus.results import CorpusResult
from tl_normmix.corpus.store import Store, Tables

__all__ = ["analyse", "parse_shard", "status"]


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"K/N"`` → ``(K, N)`` with ``0 ≤ K < N``."""
    if shard is None:
        return None
    if isinstance(shard, str):
        try:
            k, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise ValueError(f"--shard {shard!r}: expected K/N, e.g. 0/4.") from None
    else:
        k, n = shard
    if not 0 <= k < n:
        raise ValueError(f"--shard {k}/{n}: K must be in 0…N-1.")
    return k, n


def analyse(
    model_or_name: Any,
    conllu_files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    scopes: Sequence[str] = ("attn_w", "attn_n"),
    *,
    batch_size: int = 16,
    chunk_size: int = 256,
    max_sentences: int | None = None,
    engine: str = "local",
    shard: str | tuple[int, int] | None = None,
    device: str = "auto",
    dtype: str = "float32",
    truncate: bool = False,
    top_k: int = 5,
    restart: bool = False,
    progress: bool = True,
    actors: int = 1,
    cpus_per_actor: float = 1,
    gpus_per_actor: float = 0,
    address: str | None = None,
) -> CorpusResult | None:
    """Run the corpus statistics of METHODS §6 over ``conllu_files`` into ``out``.

    ``model_or_name`` is a live model (local engine only) or a reference ``load_model`` accepts
    (a name or a path: what workers and shards build their model from). Returns the reduced
    ``CorpusResult`` once every chunk is done, else None (other shards still to run).
    ``restart`` deletes the run's parts first; otherwise a run resumes when its fingerprint
    matches the manifest and is refused when it does not.
    """
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}.")
    files: list[str | os.PathLike[str]] = (
        [conllu_files] if isinstance(conllu_files, (str, os.PathLike)) else list(conllu_files)
    )
    shard_kn = parse_shard(shard)
    if batch_size < 1 or top_k < 1:
        raise ValueError("batch_size and top_k must be ≥ 1.")
    plan = make_plan(files, chunk_size, max_sentences)  # parse errors before any work
    if isinstance(model_or_name, (str, os.PathLike)):
        built = ModelSpec(str(model_or_name), device, dtype)
        spec: ModelSpec | None = built
        model = built.build()
        model_ref = str(model_or_name)
    else:
        if engine == "ray":
            raise ValueError(
                "--engine ray builds the model in every worker: pass a model name or path, not "
                "a model object (TransformerLens models do not pickle)."
            )
        spec, model = None, model_or_name
        model_ref = str(getattr(model.cfg, "model_name", type(model).__name__))
    scopes = tuple(scopes)
    options: dict[str, Any] = {
        "scopes": scopes,
        "batch_size": batch_size,
        "top_k": top_k,
        "truncate": truncate,
    }
    analyser = ChunkAnalyser(model, **options)  # refuses models without a fast tokenizer
    fp = fingerprint(
        model,
        model_ref,
        plan,
        scopes=analyser.scopes,
        batch_size=batch_size,
        top_k=top_k,
        truncate=truncate,
    )
    store = Store(out)
    if restart and store.root.exists():
        for folder in ("parts", "summary"):
            shutil.rmtree(store.root / folder, ignore_errors=True)
        store.manifest_path.unlink(missing_ok=True)
    if store.manifest_path.exists():
        old = store.read_manifest()["fingerprint"]
        differ = mismatch(old, fp)
        if differ:
            raise ValueError(
                f"{store.root} holds a run with another fingerprint (differs in: "
                f"{', '.join(differ)}); use a new --out, or --restart to discard it."
            )
    else:
        store.write_manifest(
            {
                "fingerprint": fp,
                "chunks": plan.n_chunks,
                "chunk_sentences": plan.chunk_sizes(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        )
    store.sweep()
    mine = [c for c in range(plan.n_chunks) if shard_kn is None or c % shard_kn[1] == shard_kn[0]]
    done = store.done()
    todo = [(c, plan.chunk(c)) for c in mine if c not in done]
    sizes = plan.chunk_sizes()
    bar = _bar(
        progress,
        total=sum(sizes[c] for c in mine),
        initial=sum(sizes[c] for c in mine if c in done),
    )

    def commit(chunk: int, tables: Tables) -> None:
        store.commit(chunk, tables)
        if bar is not None:
            bar.update(sizes[chunk])

    try:
        if engine == "local":
            run_local(analyser, todo, commit)
        else:
            assert spec is not None
            del analyser, model  # the workers build their own
            run_ray(
                spec,
                options,
                todo,
                commit,
                actors=actors,
                cpus_per_actor=cpus_per_actor,
                gpus_per_actor=gpus_per_actor,
                address=address,
            )
    finally:
        if bar is not None:
            bar.close()
    if len(store.done()) < plan.n_chunks:
        return None
    return reduce(store.root)


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
        "orphans": len(list(store.root.glob("**/.tmp-*"))),
        "reduced": store.summary("agg").exists(),
        "fingerprint": manifest["fingerprint"],
    }


def _bar(progress: bool, total: int, initial: int) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="sentence", desc="corpus")
