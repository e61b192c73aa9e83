"""Engines that compute the chunks not yet done: a plain loop, or a Ray Data actor pool.

Both commit through the same ``Store.commit`` in the driver and advance the same tqdm bar over
sentences (started at the sentences of the chunks already done), so resume, exactly-once and the
progress shown do not depend on the engine. Ray is imported only here, only when asked for
(``pip install 'tl_normmix[ray]'``): each actor builds the model from its ``ModelSpec`` (a live
model does not pickle), picks a GPU if Ray gave it one, and returns the chunk's tables as Parquet
bytes; the chunk's sentences travel inside the dataset rows, so workers need the weights but not
the corpus files.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from tl_normmix.corpus.chunk import ChunkAnalyser, ModelSpec
from tl_normmix.corpus.conllu import Sentence, Surface, Word
from tl_normmix.corpus.store import PARTS, Tables

__all__ = ["run_local", "run_ray"]

Commit = Callable[[int, Tables], None]


def run_local(
    analyser: ChunkAnalyser,
    todo: Iterable[tuple[int, list[tuple[int, Sentence]]]],
    commit: Commit,
) -> None:
    for chunk, sentences in todo:
        commit(chunk, analyser.run(sentences))


def _encode(sentences: list[tuple[int, Sentence]]) -> str:
    return json.dumps([(sid, asdict(s)) for sid, s in sentences])


def _decode(payload: str) -> list[tuple[int, Sentence]]:
    out = []
    for sid, s in json.loads(payload):
        words = tuple(Word(**w) for w in s["words"])
        surfaces = tuple(Surface(**u) for u in s["surfaces"])
        out.append((sid, Sentence(s["file"], s["line"], s["text"], words, surfaces)))
    return out


def _to_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False, engine="pyarrow")
    return buffer.getvalue()


class _RayChunk:
    """The Ray actor: one model, many chunks."""

    def __init__(self, spec: dict[str, Any], options: dict[str, Any]) -> None:
        import ray
        import torch

        spec = dict(spec)
        if spec["device"] == "auto":
            spec["device"] = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1) or 1)
        self.analyser = ChunkAnalyser(ModelSpec(**spec), threads=max(cpus, 1), **options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {"chunk": [], "top": [], "sentences": [], "agg": []}
        for chunk, payload in zip(batch["chunk"], batch["payload"], strict=True):
            tables = self.analyser.run(_decode(str(payload)))
            out["chunk"].append(int(chunk))
            for kind in PARTS:
                out[kind].append(_to_bytes(getattr(tables, kind)))
        return {
            k: np.asarray(v, dtype=object if k != "chunk" else np.int64) for k, v in out.items()
        }


def run_ray(
    spec: ModelSpec,
    options: dict[str, Any],
    todo: Sequence[tuple[int, list[tuple[int, Sentence]]]],
    commit: Commit,
    *,
    actors: int = 1,
    cpus_per_actor: float = 1,
    gpus_per_actor: float = 0,
    address: str | None = None,
) -> None:
    try:
        import ray
        from ray.data import ActorPoolStrategy, DataContext
    except ImportError as err:
        raise ImportError(
            "--engine ray needs Ray Data: pip install 'tl_normmix[ray]' (ray[data]>=2.51,<3)."
        ) from err
    if not todo:
        return
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    items = [{"chunk": chunk, "payload": _encode(sentences)} for chunk, sentences in todo]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _RayChunk,
        fn_constructor_kwargs={"spec": asdict(spec), "options": options},
        batch_size=1,
        compute=ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
    )
    for row in dataset.iter_rows():
        tables = Tables(**{k: pd.read_parquet(io.BytesIO(row[k])) for k in PARTS})
        commit(int(row["chunk"]), tables)
