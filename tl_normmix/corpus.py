"""Annotated corpora: sentences from CoNLL-U files (Universal Dependencies)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["conllu_texts"]


def conllu_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """The ``# text =`` sentence lines of a CoNLL-U file, in order (at most ``limit``)."""
    texts: list[str] = []
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("# text ="):
                texts.append(line.split("=", 1)[1].strip())
                if limit is not None and len(texts) >= limit:
                    break
    return texts
