"""Annotated corpora: sentences of CoNLL-U files (Universal Dependencies), read with ``conllu``.

Policy (recorded in every corpus run's fingerprint, ``POLICY``):

* the words are the *syntactic* words (integer ids); their ``HEAD``, ``DEPREL`` (subtypes folded
  to the universal label: ``nsubj:pass`` → ``nsubj``) and ``UPOS`` are kept;
* a multiword token (``3-4 don't`` = ``do`` + ``n't``) is one *surface* unit located in the
  ``# text`` line; its words split its characters when their forms concatenate to it, and the
  sentence's alignment fails (counted and listed, never guessed) when they do not;
* empty nodes (``8.1``; enhanced graphs only) are ignored: they are not in the text and basic
  dependencies never point at them;
* a sentence without ``# text`` is rebuilt from its surface forms and ``SpaceAfter=No``.

A malformed line (not 10 tab-separated fields, an id or head that is not a number, a head outside
the sentence) raises ``CorpusFormatError`` naming the file and line; an empty or missing file too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from conllu.exceptions import ParseException
from conllu.parser import DEFAULT_FIELDS, parse_line

__all__ = [
    "POLICY",
    "CorpusFormatError",
    "Sentence",
    "Surface",
    "Word",
    "conllu_texts",
    "read_conllu",
]

POLICY = (
    "syntactic words; universal relations (subtypes folded); multiword tokens split by their "
    "words' forms, else the sentence fails alignment; empty nodes ignored"
)


class CorpusFormatError(ValueError):
    """A CoNLL-U file that cannot be read: the message names the file and line."""


@dataclass(frozen=True)
class Word:
    """A syntactic word: 0-based ``head`` index into the sentence's words, -1 for the root."""

    form: str
    upos: str
    head: int
    deprel: str


@dataclass(frozen=True)
class Surface:
    """A surface unit of the text: one word, or the words ``first..last`` of a multiword token."""

    form: str
    first: int
    last: int
    space_after: bool = True


@dataclass(frozen=True)
class Sentence:
    """One sentence: where it comes from, its text, its words and their surface units."""

    file: str
    line: int
    text: str
    words: tuple[Word, ...]
    surfaces: tuple[Surface, ...] = field(repr=False)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


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


def read_conllu(path: str | Path) -> list[Sentence]:
    """Every sentence of ``path`` in order (see the module docstring for the policy)."""
    path = Path(path)
    if not path.is_file():
        raise CorpusFormatError(f"{path}: no such CoNLL-U file.")
    sentences: list[Sentence] = []
    block: list[tuple[int, str]] = []
    with path.open(encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.rstrip("\n").rstrip("\r")
            if line.strip():
                block.append((number, line))
            elif block:
                sentences.extend(_sentence(path, block))
                block = []
    if block:
        sentences.extend(_sentence(path, block))
    if not sentences:
        raise CorpusFormatError(f"{path}: holds no sentence (empty or only comments).")
    return sentences


def _sentence(path: Path, block: list[tuple[int, str]]) -> list[Sentence]:
    """The block's sentence, or nothing for a block of comments only."""
    if all(line.startswith("#") for _, line in block):
        return []
    text: str | None = None
    words: list[tuple[int, Word]] = []  # (line, word) with 1-based heads for now
    ranges: dict[int, tuple[int, str, bool, int]] = {}  # first id -> (last id, form, space, line)
    ids: list[int] = []
    spaces: dict[int, bool] = {}
    for number, line in block:
        if line.startswith("#"):
            if line.startswith("# text =") or line.startswith("# text="):
                text = line.split("=", 1)[1].strip()
            continue
        columns = line.split("\t")
        if len(columns) != 10:
            raise CorpusFormatError(
                f"{path}:{number}: expected 10 tab-separated fields, found {len(columns)}: "
                f"{line[:80]!r}"
            )
        try:
            token = parse_line(line, fields=DEFAULT_FIELDS)
        except ParseException as err:
            raise CorpusFormatError(f"{path}:{number}: {err}") from None
        token_id = token["id"]
        space = "SpaceAfter=No" not in columns[9]
        if isinstance(token_id, tuple):
            if token_id[1] == "-":
                first, last = int(token_id[0]), int(token_id[2])
                ranges[first] = (last, token["form"], space, number)
            continue  # "." ids: empty nodes
        if not isinstance(token_id, int) or not isinstance(token["head"], int):
            raise CorpusFormatError(
                f"{path}:{number}: a syntactic word needs an integer id and head: {line[:80]!r}"
            )
        ids.append(token_id)
        spaces[token_id] = space
        deprel = str(token["deprel"]).split(":")[0]
        words.append((number, Word(token["form"], str(token["upos"]), token["head"], deprel)))
    start = block[0][0]
    if not words:
        raise CorpusFormatError(f"{path}:{start}: a sentence without syntactic words.")
    if ids != list(range(1, len(ids) + 1)):
        raise CorpusFormatError(f"{path}:{start}: word ids are not 1, 2, …, n: {ids[:12]}")
    n = len(words)
    checked = []
    for number, word in words:
        if not 0 <= word.head <= n:
            raise CorpusFormatError(
                f"{path}:{number}: head {word.head} is outside the sentence (1–{n}, or 0)."
            )
        checked.append(Word(word.form, word.upos, word.head - 1, word.deprel))
    surfaces: list[Surface] = []
    i = 1
    while i <= n:
        if i in ranges:
            last, form, space, number = ranges[i]
            if not i <= last <= n:
                raise CorpusFormatError(f"{path}:{number}: range {i}-{last} is outside 1–{n}.")
            surfaces.append(Surface(form, i - 1, last - 1, space))
            i = last + 1
        else:
            surfaces.append(Surface(checked[i - 1].form, i - 1, i - 1, spaces[i]))
            i += 1
    if text is None:
        text = "".join(s.form + (" " if s.space_after else "") for s in surfaces).strip()
    return [Sentence(str(path), start, text, tuple(checked), tuple(surfaces))]
