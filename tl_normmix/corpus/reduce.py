"""``reduce``: merge the chunks' parts into the run's summary — identical whatever ran them.

Partial sums are added per ``(stat, scope, layer, head, key)`` in float64 over the chunks in
chunk order (counts in int64), so the result does not depend on the engine, the order in which
chunks finished, or interruptions; top-k exemplars are the top-k of the chunks' top-k ordered by
``(score desc, sentence id asc)``. Idempotent: it only reads parts and rewrites the summary.
"""

from __future__ import annotations

import os

import pandas as pd

from tl_normmix.corpus.results import CorpusResult
from tl_normmix.corpus.store import Store

__all__ = ["reduce"]

KEYS = ["stat", "scope", "layer", "head", "key"]
TOP_KEYS = ["stat", "scope", "layer", "head"]


def reduce(out: str | os.PathLike[str]) -> CorpusResult:
    store = Store(out)
    manifest = store.read_manifest()
    done = store.done()
    total = manifest["chunks"]
    missing = sorted(set(range(total)) - done)
    if missing:
        raise ValueError(
            f"{store.root}: {total - len(missing)} of {total} chunks done (missing e.g. "
            f"{missing[:5]}); run the remaining shards (or analyse again) before reduce."
        )
    chunks = range(total)
    agg = pd.concat([store.read_part("agg", c) for c in chunks], ignore_index=True)
    summed = agg.groupby(KEYS, sort=True).agg({"sum": "sum", "count": "sum"}).reset_index()
    top = pd.concat([store.read_part("top", c) for c in chunks], ignore_index=True)
    k = int(manifest["fingerprint"]["top_k"])
    top = top.sort_values(
        [*TOP_KEYS, "score", "sentence_id"],
        ascending=[True, True, True, True, False, True],
        kind="mergesort",
    )
    top = top.groupby(TOP_KEYS, sort=True).head(k).reset_index(drop=True)
    top["rank"] = top.groupby(TOP_KEYS, sort=False).cumcount()
    sentences = pd.concat([store.read_part("sentences", c) for c in chunks], ignore_index=True)
    shown = set(top.sentence_id.tolist())
    hide = ~sentences.sentence_id.isin(shown)
    sentences.loc[hide, "text"] = None
    sentences.loc[hide, "tokens"] = None
    for name, frame in (("agg", summed), ("top", top), ("sentences", sentences)):
        store.write_table(store.summary(name), frame)
    return CorpusResult.load(store.root)
