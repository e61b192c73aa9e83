"""``nm.corpus.load(DIR)``: the reduced statistics of a corpus run as pandas DataFrames.

Every method takes a scope and returns a DataFrame; ``head`` is -1 for the layer map (per-head
scopes — ``attn_w``, ``attn_n`` — have both their heads and the layer map). Shares are ratios of
corpus-wide sums (methods.md#corpus-statistics), so a statistic weighs every word (or token row) of
the corpus equally, whichever chunk or machine computed it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tl_normmix.corpus.statistics import DIRECTIONS, EXEMPLAR_STATISTICS

__all__ = ["CorpusResult", "load"]

NOT_REPORTED = ("root", "punct", "other")  # counted in "all", no rows of their own


@dataclass(repr=False)
class CorpusResult:
    """A reduced corpus run: every statistic as a pandas table (``nm.corpus.load``)."""

    root: Path
    manifest: dict[str, Any]
    agg: pd.DataFrame
    top: pd.DataFrame
    sentences: pd.DataFrame

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> CorpusResult:
        root = Path(root)
        summary = root / "summary"
        if not (summary / "agg.parquet").exists():
            raise FileNotFoundError(
                f"{root} has no summary yet: run `tl-normmix corpus reduce {root}` once every "
                "chunk is done (`tl-normmix corpus status` says how many are)."
            )
        manifest = json.loads((root / "manifest.json").read_text())
        return cls(
            root,
            manifest,
            pd.read_parquet(summary / "agg.parquet"),
            pd.read_parquet(summary / "top.parquet"),
            pd.read_parquet(summary / "sentences.parquet"),
        )

    def __repr__(self) -> str:
        fp = self.manifest["fingerprint"]
        statuses = ", ".join(f"{r.sentences} {r.status}" for r in self.summary().itertuples())
        return (
            f"CorpusResult({str(self.root)!r}, model={fp.get('model')!r}, scopes={self.scopes}, "
            f"sentences: {statuses or 'none'})"
        )

    # -- helpers ----------------------------------------------------------------------------
    @property
    def policy(self) -> dict[str, str]:
        """How words met tokens in this run: ``tokenization``, ``alignment`` and the CoNLL-U
        reading policy (``words``)."""
        fp = self.manifest["fingerprint"]
        return {
            "tokenization": fp.get("tokenization", "text"),
            "alignment": fp.get("alignment", "strict"),
            "words": fp.get("alignment_policy", ""),
        }

    @property
    def scopes(self) -> list[str]:
        return list(self.manifest["fingerprint"]["scopes"])

    def _stat(self, stat: str, scope: str) -> pd.DataFrame:
        if scope not in self.scopes:
            raise KeyError(f"scope {scope!r} was not analysed; this run has {self.scopes}.")
        rows = self.agg[(self.agg.stat == stat) & (self.agg.scope == scope)].copy()
        rows = rows[rows["count"] > 0]
        rows["value"] = rows["sum"] / rows["count"]
        return rows

    def _heads_of(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Real heads where the scope has them, else the layer map."""
        per_head = bool((frame["head"] >= 0).any())
        return frame[frame["head"] >= 0] if per_head else frame

    # -- the sentences --------------------------------------------------------------------------
    def summary(self) -> pd.DataFrame:
        """Sentences per status (analysed, truncated, alignment_failed, too_long) and tokens."""
        rows = self.agg[self.agg.stat == "sentences"][["key", "count"]]
        return rows.rename(columns={"key": "status", "count": "sentences"}).reset_index(drop=True)

    def failures(self) -> pd.DataFrame:
        """Every sentence not analysed in full: id, file, line, status, reason."""
        bad = self.sentences[self.sentences.status != "analysed"]
        return bad[["sentence_id", "file", "line", "status", "reason"]].reset_index(drop=True)

    # -- Clark et al. 2019 ------------------------------------------------------------------
    def relation_accuracy(self, scope: str) -> pd.DataFrame:
        """relation, direction, layer, head, accuracy, count (root/punct only inside "all")."""
        rows = self._stat("clark", scope)
        parts = rows.key.str.split("|", expand=True)
        rows["direction"], rows["relation"] = parts[0], parts[1]
        rows = rows[~rows.relation.isin(NOT_REPORTED)]
        out = rows.rename(columns={"value": "accuracy"})
        columns = ["relation", "direction", "layer", "head", "accuracy", "count"]
        return out[columns].reset_index(drop=True)

    def offset_accuracy(self) -> pd.DataFrame:
        """relation, offset, accuracy, count: the positional baseline."""
        rows = self.agg[(self.agg.stat == "offset") & (self.agg["count"] > 0)].copy()
        parts = rows.key.str.split("|", expand=True)
        rows["offset"], rows["relation"] = parts[0].astype(int), parts[1]
        rows["accuracy"] = rows["sum"] / rows["count"]
        rows = rows[~rows.relation.isin(NOT_REPORTED)]
        return rows[["relation", "offset", "accuracy", "count"]].reset_index(drop=True)

    def best_heads(self, scope: str) -> pd.DataFrame:
        """Clark's Table 1: per relation (most frequent first) the best (layer, head, direction)
        and its accuracy, against the best fixed offset and its accuracy."""
        acc = self._heads_of(self.relation_accuracy(scope))
        order = {d: i for i, d in enumerate(DIRECTIONS)}
        acc = acc.assign(_d=acc.direction.map(order)).sort_values(
            ["relation", "accuracy", "layer", "head", "_d"],
            ascending=[True, False, True, True, True],
            kind="mergesort",
        )
        best = acc.groupby("relation", sort=False).head(1).drop(columns="_d")
        offsets = self.offset_accuracy().sort_values(
            ["relation", "accuracy", "offset"], ascending=[True, False, True], kind="mergesort"
        )
        best_offset = offsets.groupby("relation", sort=False).head(1)
        best_offset = best_offset.rename(columns={"accuracy": "offset_accuracy"})
        table = best.merge(best_offset[["relation", "offset", "offset_accuracy"]], on="relation")
        table["gain"] = table.accuracy - table.offset_accuracy
        table = table.sort_values(["count", "relation"], ascending=[False, True])
        columns = [
            "relation",
            "count",
            "layer",
            "head",
            "direction",
            "accuracy",
            "offset",
            "offset_accuracy",
            "gain",
        ]
        return table[columns].reset_index(drop=True)

    def special_share(self, scope: str) -> pd.DataFrame:
        """layer, head, kind (cls | sep | first | punct), share: mean over receiving words."""
        rows = self._stat("special", scope).rename(columns={"key": "kind", "value": "share"})
        return rows[["layer", "head", "kind", "share"]].reset_index(drop=True)

    # -- Vig & Belinkov 2019 -----------------------------------------------------------------
    def pos_share(self, scope: str) -> pd.DataFrame:
        """layer, head, upos, share of each part of speech among the attended tokens."""
        rows = self._stat("pos", scope).rename(columns={"key": "upos", "value": "share"})
        return rows[["layer", "head", "upos", "share"]].reset_index(drop=True)

    def dependency_alignment(self, scope: str) -> pd.DataFrame:
        """layer, head, variant (head | dependent | either), share on dependency arcs."""
        rows = self._stat("dependency", scope).rename(columns={"key": "variant", "value": "share"})
        return rows[["layer", "head", "variant", "share"]].reset_index(drop=True)

    def distance(self, scope: str) -> pd.DataFrame:
        """layer, head, value: the mean attention distance in tokens, ``Σα̃(i − j)``."""
        return self._stat("distance", scope)[["layer", "head", "value"]].reset_index(drop=True)

    def entropy(self, scope: str) -> pd.DataFrame:
        """layer, head, value: the mean entropy (nats) of the renormalised rows."""
        return self._stat("entropy", scope)[["layer", "head", "value"]].reset_index(drop=True)

    def exemplars(
        self, scope: str, statistic: str, layer: int, head: int, k: int = 5
    ) -> pd.DataFrame:
        """The ``k`` sentences where ``statistic`` (``dependency_alignment``, ``distance``,
        ``first``) is highest for the map: rank, score, sentence id, text, tokens, the query
        token that shows it most and its map row."""
        if statistic not in EXEMPLAR_STATISTICS:
            raise KeyError(f"statistic must be one of {EXEMPLAR_STATISTICS}, got {statistic!r}.")
        self._stat("distance", scope)  # validates the scope
        rows = (
            self.top[
                (self.top.stat == statistic)
                & (self.top.scope == scope)
                & (self.top.layer == layer)
                & (self.top["head"] == head)
            ]
            .sort_values("rank")
            .head(k)
        )
        texts = self.sentences.set_index("sentence_id")
        rows = rows.assign(
            text=[texts.text.get(s) for s in rows.sentence_id],
            tokens=[list(texts.tokens.get(s)) for s in rows.sentence_id],
        )
        columns = ["rank", "score", "sentence_id", "text", "tokens", "query", "row"]
        return rows[columns].reset_index(drop=True)


def load(out: str | os.PathLike[str]) -> CorpusResult:
    """The reduced statistics of the run in ``out``."""
    return CorpusResult.load(out)
