"""Corpus analyses (methods.md#corpus-statistics): Clark et al. 2019 and Vig & Belinkov 2019 for
every scope, resumable, exactly-once, on a local loop, shards or a Ray Data actor pool.

    res = nm.corpus.analyse("all-MiniLM-L6-v2", ["en_ewt-ud-dev.conllu"], "runs/ewt")
    res = nm.corpus.load("runs/ewt"); res.best_heads("attn_n")

Flow: ``conllu`` (sentences) → ``alignment`` (words ↔ tokens) → ``statistics`` (pure tensor sums
of one sentence) → ``chunk`` (a chunk on a model) → ``plan`` / ``store`` / ``engines`` →
``analyse`` → ``reduce`` → ``results``. Ray is imported only by ``engines.run_ray``.
"""

from tl_normmix.corpus.alignment import Aligned, AlignmentError, align
from tl_normmix.corpus.analyse import analyse, status
from tl_normmix.corpus.config import CorpusConfig
from tl_normmix.corpus.conllu import CorpusFormatError, Sentence, conllu_texts, read_conllu
from tl_normmix.corpus.reduce import reduce
from tl_normmix.corpus.results import CorpusResult, load

__all__ = [
    "Aligned",
    "AlignmentError",
    "CorpusConfig",
    "CorpusFormatError",
    "CorpusResult",
    "Sentence",
    "align",
    "analyse",
    "conllu_texts",
    "load",
    "read_conllu",
    "reduce",
    "status",
]
