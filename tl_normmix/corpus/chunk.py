"""One chunk of a corpus run: sentences → maps → partial sums, top-k exemplars and failures.

``ChunkAnalyser`` holds the model (built from a ``ModelSpec`` in a worker, or a live model in the
local engine) and maps a chunk of ``(sentence_id, Sentence)`` to three small tables (``Tables``):

* ``agg`` — ``stat, scope, layer, head, key, sum (float64), count (int64)``: every statistic of
  ``statistics.sentence_sums`` summed over the chunk (head = -1: the layer map);
* ``top`` — the chunk's ``k`` best sentences per ``(scope, layer, head, statistic)`` with the row
  that shows it (``query`` and its map row), ties to the lower sentence id;
* ``sentences`` — sentence id, file, line, status (analysed | alignment_failed | too_long |
  truncated), reason, and for the exemplars their text and token strings.

Sentences are batched in order (``batch_size``), run once with only the hooks the scopes need,
and each row's maps are cut to its own tokens, so padding never enters a statistic.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from tl_normmix.corpus.alignment import (
    Aligned,
    Alignment,
    AlignmentError,
    Tokenization,
    align,
    align_words,
)
from tl_normmix.corpus.conllu import Sentence
from tl_normmix.corpus.statistics import (
    DIRECTIONS,
    EXEMPLAR_STATISTICS,
    KINDS,
    OFFSETS,
    RELATIONS,
    UPOS,
    VARIANTS,
    SentenceLabels,
    SentenceSums,
    sentence_sums,
    word_matrices,
)
from tl_normmix.corpus.store import Tables
from tl_normmix.maps import hook_filter, mixing_maps
from tl_normmix.maps.scopes import resolve_scopes
from tl_normmix.models.adapter import adapt
from tl_normmix.models.editing import editor

__all__ = ["ChunkAnalyser", "ModelSpec", "sentence_labels"]


@dataclass(frozen=True)
class ModelSpec:
    """How a worker builds the model: a reference ``load_model`` accepts, device and dtype."""

    ref: str
    device: str = "auto"
    dtype: str = "float32"

    def build(self) -> Any:
        from tl_normmix.models.loading import load_model

        return load_model(
            self.ref, dtype=getattr(torch, self.dtype), device=resolve_device(self.device)
        )


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use cpu or auto.")
    return device


class ChunkAnalyser:
    """Computes the tables of chunks of sentences on one model (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        scopes: Sequence[str],
        *,
        batch_size: int = 16,
        top_k: int = 5,
        truncate: bool = False,
        tokenization: Tokenization = "text",
        alignment: Alignment = "strict",
        threads: int | None = None,
    ) -> None:
        if isinstance(model, ModelSpec):
            if threads:
                torch.set_num_threads(threads)
            model = model.build()
        self.model = model
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None or not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "Corpus analyses align words to tokens through character offsets, which need a "
                "fast (Rust) tokenizer; this model has "
                f"{type(tokenizer).__name__ if tokenizer is not None else 'none'}. Load it with a "
                "fast tokenizer (transformers' AutoTokenizer(..., use_fast=True))."
            )
        self.tokenizer = tokenizer
        self.scopes = tuple(s.name for s in resolve_scopes(scopes))
        self.per_head = {s.name: s.has_heads for s in resolve_scopes(scopes)}
        self.batch_size = batch_size
        self.top_k = top_k
        self.truncate = truncate
        self.tokenization, self.alignment = tokenization, alignment
        self.bos = self._prepended_bos()
        adapter = adapt(model)
        self.causal = adapter.spec.causal
        self.n_ctx = int(model.cfg.n_ctx)
        self.n_layers = int(model.cfg.n_layers)
        self.n_heads = int(model.cfg.n_heads)
        self.names = hook_filter(model, self.scopes)
        self.seconds: dict[str, float] = {
            "prepare": 0.0,
            "forward": 0.0,
            "maps": 0.0,
            "statistics": 0.0,
        }  # where the time goes
        self.entries = [
            (scope, layer, head)
            for scope in self.scopes
            for layer in range(self.n_layers)
            for head in ([*range(self.n_heads), -1] if self.per_head[scope] else [-1])
        ]

    # -- tokens -----------------------------------------------------------------------------
    def _tl_tokens(self, text: str) -> list[int]:
        tokens = self.model.to_tokens(text, truncate=False, move_to_device=False)
        if isinstance(tokens, tuple):  # TransformerLens 2.x HookedEncoder: (tokens, types, mask)
            tokens = tokens[0]
        return [int(t) for t in tokens[0].tolist()]

    def _prepended_bos(self) -> int | None:
        """The token TransformerLens puts before the tokenizer's own tokens (a BOS), if any."""
        tl = self._tl_tokens("a")
        ids = list(self.tokenizer("a", add_special_tokens=True)["input_ids"])
        return tl[0] if tl[1:] == ids else None

    def prepare(self, sentence: Sentence) -> tuple[Aligned | None, str, str]:
        """The aligned sentence (or None) with its status and reason."""
        try:
            if self.tokenization == "words":
                aligned = align_words(sentence, self.tokenizer, self.bos)
            else:
                tokens = self._tl_tokens(sentence.text)
                aligned = align(sentence, self.tokenizer, tokens, self.alignment)
        except AlignmentError as err:
            return None, "alignment_failed", str(err)
        if len(aligned) <= self.n_ctx:
            return aligned, "analysed", ""
        reason = f"{len(aligned)} tokens > the model's context of {self.n_ctx}"
        if not self.truncate:
            return None, "too_long", reason
        return _truncated(aligned, self.n_ctx), "truncated", reason + "; truncated"

    def labels(self, aligned: Aligned) -> SentenceLabels:
        return sentence_labels(aligned, self.causal)

    # -- one chunk --------------------------------------------------------------------------
    def run(self, sentences: Sequence[tuple[int, Sentence]]) -> Tables:
        clock = time.perf_counter()
        prepared = [(sid, s, *self.prepare(s)) for sid, s in sentences]
        self.seconds["prepare"] += time.perf_counter() - clock
        todo = [(sid, a) for sid, _, a, _, _ in prepared if a is not None]
        acc = _Accumulator(self.entries, self.top_k, max((len(a) for _, a in todo), default=1))
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            stacks = self._maps(batch)
            clock = time.perf_counter()
            for (sid, aligned), maps in zip(batch, stacks, strict=True):
                acc.add(sid, maps, sentence_sums(maps, self.labels(aligned)))
            self.seconds["statistics"] += time.perf_counter() - clock
        status = pd.DataFrame(
            {
                "sentence_id": [p[0] for p in prepared],
                "file": [os.path.basename(p[1].file) for p in prepared],
                "line": [p[1].line for p in prepared],
                "status": [p[3] for p in prepared],
                "reason": [p[4] for p in prepared],
            }
        )
        top = acc.top()
        shown = set(top.sentence_id.tolist())
        by_id = {sid: a for sid, a in todo}
        status["text"] = [p[1].text if p[0] in shown else None for p in prepared]
        status["tokens"] = [list(by_id[p[0]].strings) if p[0] in shown else None for p in prepared]
        agg = acc.agg()
        counts = status.groupby("status", sort=True).size()
        extra = pd.DataFrame(
            {
                "stat": "sentences",
                "scope": "",
                "layer": -1,
                "head": -1,
                "key": counts.index.astype(str),
                "sum": 0.0,
                "count": counts.to_numpy(dtype=np.int64),
            }
        )
        tokens = sum(len(a) for _, a in todo)
        extra_tokens = pd.DataFrame(
            {
                "stat": ["tokens"],
                "scope": [""],
                "layer": [-1],
                "head": [-1],
                "key": [""],
                "sum": [float(tokens)],
                "count": [np.int64(len(todo))],
            }
        )
        return Tables(pd.concat([agg, extra, extra_tokens], ignore_index=True), top, status)

    def _maps(self, batch: Sequence[tuple[int, Aligned]]) -> list[torch.Tensor]:
        """One ``[entry, n, n]`` stack per sentence of the batch (``self.entries`` order)."""
        model = self.model
        device = model.cfg.device
        tokens, mask, kwargs = self._inputs([a for _, a in batch])
        clock = time.perf_counter()
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=self.names, **kwargs)
            _sync(device)
            self.seconds["forward"] += time.perf_counter() - clock
            clock = time.perf_counter()
            maps = mixing_maps(model, cache, self.scopes, attention_mask=mask)
        del cache
        out = []
        for row, (_, aligned) in enumerate(batch):
            k = len(aligned)
            parts = []
            for scope in self.scopes:
                layer_maps = maps.maps[scope][:, row, :k, :k]  # [layer, q, k]
                if self.per_head[scope]:
                    heads = maps.heads[scope][:, row, :, :k, :k]  # [layer, head, q, k]
                    parts.append(torch.cat([heads, layer_maps[:, None]], 1).flatten(0, 1))
                else:
                    parts.append(layer_maps)
            out.append(torch.cat(parts).float())
        _sync(device)
        self.seconds["maps"] += time.perf_counter() - clock
        return out

    def _inputs(self, batch: Sequence[Aligned]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Right-padded tokens, the padding mask, and the keyword passing it to the model."""
        n = max(len(a) for a in batch)
        pad = self.tokenizer.pad_token_id
        tokens = torch.full((len(batch), n), 0 if pad is None else int(pad), dtype=torch.long)
        mask = torch.zeros(len(batch), n, dtype=torch.long)
        for row, aligned in enumerate(batch):
            tokens[row, : len(aligned)] = torch.tensor(aligned.tokens)
            mask[row, : len(aligned)] = 1
        device = self.model.cfg.device
        tokens, mask = tokens.to(device), mask.to(device)
        kwargs = editor(self.model).mask_kwargs(mask) if bool((mask == 0).any()) else {}
        return tokens, mask, kwargs

    def batches(
        self, sentences: Sequence[tuple[int, Sentence]]
    ) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """The ``run_with_cache`` arguments ``run`` uses for ``sentences`` (for benchmarks)."""
        todo = [a for _, s in sentences if (a := self.prepare(s)[0]) is not None]
        out = []
        for start in range(0, len(todo), self.batch_size):
            tokens, _, kwargs = self._inputs(todo[start : start + self.batch_size])
            out.append((tokens, {"names_filter": self.names, **kwargs}))
        return out


def sentence_labels(aligned: Aligned, causal: bool) -> SentenceLabels:
    """The tensors ``sentence_sums`` reads: words renumbered over those that kept a token (all of
    them unless the sentence was truncated), relations and parts of speech as indices."""
    words = aligned.sentence.words
    token_words = [aligned.words_of(t) for t in range(len(aligned))]
    keep = sorted({w for ws in token_words for w in ws})
    renumber = {old: new for new, old in enumerate(keep)}
    rel = {r: i for i, r in enumerate(RELATIONS)}
    upos = {u: i for i, u in enumerate(UPOS)}
    columns, rows = word_matrices([tuple(renumber[w] for w in ws) for ws in token_words], len(keep))
    return SentenceLabels(
        piece_word=torch.tensor([renumber.get(w, -1) for w in aligned.piece_word]),
        columns=columns,
        rows=rows,
        special=torch.tensor(aligned.special),
        head=torch.tensor([renumber.get(words[w].head, -1) for w in keep], dtype=torch.long),
        relation=torch.tensor(
            [rel.get(words[w].deprel, rel["other"]) for w in keep], dtype=torch.long
        ),
        upos=torch.tensor([upos.get(words[w].upos, -1) for w in keep], dtype=torch.long),
        causal=causal,
    )


def _sync(device: Any) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _truncated(aligned: Aligned, n: int) -> Aligned:
    """The first ``n`` tokens; words with a token beyond them leave the sentence's statistics."""
    token_words = [aligned.words_of(t) for t in range(len(aligned))]
    cut = {w for ws in token_words[n:] for w in ws}
    kept = tuple(tuple(w for w in ws if w not in cut) for ws in token_words[:n])
    piece_word = tuple(ws[0] if ws else -1 for ws in kept)
    return Aligned(
        aligned.sentence,
        aligned.tokens[:n],
        piece_word,
        aligned.special[:n],
        aligned.strings[:n],
        kept,
    )


class _Accumulator:
    """Float64 sums of a chunk and its running top-k exemplars."""

    def __init__(self, entries: list[tuple[str, int, int]], k: int, max_len: int) -> None:
        m = len(entries)
        self.entries = entries
        self.k = k
        z = torch.zeros
        self.clark = z(m, 2, len(RELATIONS), dtype=torch.float64)
        self.clark_count = z(len(RELATIONS), dtype=torch.float64)
        self.offset = z(len(OFFSETS), len(RELATIONS), dtype=torch.float64)
        self.special = z(m, len(KINDS), dtype=torch.float64)
        self.special_count = z(len(KINDS), dtype=torch.float64)
        self.pos = z(m, len(UPOS), dtype=torch.float64)
        self.dependency = z(m, len(VARIANTS), dtype=torch.float64)
        self.distance = z(m, dtype=torch.float64)
        self.rows = z(m, dtype=torch.float64)
        self.entropy = z(m, dtype=torch.float64)
        self.entropy_rows = z(m, dtype=torch.float64)
        s = len(EXEMPLAR_STATISTICS)
        self.best = torch.full((m, s, k), float("-inf"), dtype=torch.float64)
        self.best_id = torch.full((m, s, k), -1, dtype=torch.long)
        self.best_query = torch.zeros(m, s, k, dtype=torch.long)
        self.best_len = torch.zeros(m, s, k, dtype=torch.long)
        self.best_rows = torch.zeros(m, s, k, max_len, dtype=torch.float32)

    def add(self, sid: int, maps: torch.Tensor, sums: SentenceSums) -> None:
        sums = _to_cpu(sums)
        self.clark += sums.clark_correct
        self.clark_count += sums.clark_count
        self.offset += sums.offset_correct
        exists = ~sums.special[0].isnan()
        self.special += sums.special.nan_to_num(0.0)
        self.special_count += exists.double() * sums.words
        self.pos += sums.pos
        self.dependency += sums.dependency
        self.distance += sums.distance
        self.rows += sums.rows
        self.entropy += sums.entropy
        self.entropy_rows += sums.entropy_rows
        # running top-k: candidates after the kept ones, stable sort → ties keep the lower id
        m, s, _ = self.best.shape
        n = maps.shape[-1]
        score = sums.exemplar_score.nan_to_num(float("-inf"))
        rows = maps.cpu().float()
        rows = rows / rows.sum(-1, keepdim=True).clamp_min(1e-30)
        chosen = rows[torch.arange(m)[:, None], sums.exemplar_row]  # [m, s, n]
        padded = torch.zeros(m, s, 1, self.best_rows.shape[-1])
        padded[..., :n] = chosen[:, :, None]
        scores = torch.cat([self.best, score[..., None]], -1)
        order = scores.sort(dim=-1, descending=True, stable=True).indices[..., : self.k]
        self.best = scores.gather(-1, order)
        self.best_id = torch.cat([self.best_id, torch.full((m, s, 1), sid)], -1).gather(-1, order)
        self.best_query = torch.cat([self.best_query, sums.exemplar_row[..., None]], -1).gather(
            -1, order
        )
        self.best_len = torch.cat([self.best_len, torch.full((m, s, 1), n)], -1).gather(-1, order)
        all_rows = torch.cat([self.best_rows, padded], 2)
        self.best_rows = all_rows.gather(2, order[..., None].expand(-1, -1, -1, all_rows.shape[-1]))

    def _frame(
        self, stat: str, keys: Sequence[str], sums: torch.Tensor, counts: Any
    ) -> pd.DataFrame:
        """Long rows for ``sums`` ``[entry, key]`` with ``counts`` ``[key]`` or ``[entry, key]``."""
        m = len(self.entries)
        counts_t = torch.as_tensor(counts, dtype=torch.float64)
        counts_t = counts_t.expand(m, len(keys)) if counts_t.dim() <= 1 else counts_t
        scope, layer, head = zip(*self.entries, strict=True)
        return pd.DataFrame(
            {
                "stat": stat,
                "scope": np.repeat(scope, len(keys)),
                "layer": np.repeat(layer, len(keys)).astype(np.int64),
                "head": np.repeat(head, len(keys)).astype(np.int64),
                "key": np.tile(np.asarray(keys, dtype=object), m),
                "sum": sums.reshape(-1).numpy(),
                "count": counts_t.reshape(-1).round().numpy().astype(np.int64),
            }
        )

    def agg(self) -> pd.DataFrame:
        m = len(self.entries)
        clark_keys = [f"{d}|{r}" for d in DIRECTIONS for r in RELATIONS]
        offset_keys = [f"{k}|{r}" for k in OFFSETS for r in RELATIONS]
        frames = [
            self._frame(
                "clark",
                clark_keys,
                self.clark.reshape(m, -1),
                self.clark_count.repeat(len(DIRECTIONS)),
            ),
            self._frame("special", KINDS, self.special, self.special_count),
            self._frame("pos", UPOS, self.pos, self.rows[:, None].expand(-1, len(UPOS))),
            self._frame(
                "dependency",
                VARIANTS,
                self.dependency,
                self.rows[:, None].expand(-1, len(VARIANTS)),
            ),
            self._frame("distance", [""], self.distance[:, None], self.rows[:, None]),
            self._frame("entropy", [""], self.entropy[:, None], self.entropy_rows[:, None]),
            pd.DataFrame(
                {
                    "stat": "offset",
                    "scope": "",
                    "layer": -1,
                    "head": -1,
                    "key": offset_keys,
                    "sum": self.offset.reshape(-1).numpy(),
                    "count": self.clark_count.repeat(len(OFFSETS)).numpy().astype(np.int64),
                }
            ),
        ]
        return pd.concat(frames, ignore_index=True)

    def top(self) -> pd.DataFrame:
        records = []
        for e, (scope, layer, head) in enumerate(self.entries):
            for s, stat in enumerate(EXEMPLAR_STATISTICS):
                for r in range(self.k):
                    sid = int(self.best_id[e, s, r])
                    if sid < 0:
                        continue
                    n = int(self.best_len[e, s, r])
                    records.append(
                        (
                            stat,
                            scope,
                            layer,
                            head,
                            r,
                            float(self.best[e, s, r]),
                            sid,
                            int(self.best_query[e, s, r]),
                            self.best_rows[e, s, r, :n].tolist(),
                        )
                    )
        columns = ["stat", "scope", "layer", "head", "rank", "score", "sentence_id", "query", "row"]
        return pd.DataFrame.from_records(records, columns=columns)


def _to_cpu(sums: SentenceSums) -> SentenceSums:
    values: dict[str, Any] = {
        k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(sums).items()
    }
    return SentenceSums(**values)
