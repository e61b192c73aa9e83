"""The annotated corpora the tests read, from ``../shared`` beside the clone (never copied)."""

from __future__ import annotations

from pathlib import Path

from tl_normmix.corpus import conllu_texts

SHARED = Path(__file__).resolve().parents[3] / "shared"
EWT_DEV = SHARED / "data" / "ud" / "UD_English-EWT" / "en_ewt-ud-dev.conllu"


def ewt_sentences(n: int) -> list[str]:
    """The first ``n`` ``# text =`` lines of UD English-EWT dev, read from ``../shared``."""
    if not EWT_DEV.exists():
        raise FileNotFoundError(
            f"{EWT_DEV} is missing: the tests expect ../shared beside the clone."
        )
    return conllu_texts(EWT_DEV, n)
