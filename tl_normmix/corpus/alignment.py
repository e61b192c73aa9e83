"""Words of a CoNLL-U sentence ↔ the model's tokens, through character offsets
(methods.md#corpus-statistics).

Each surface unit is located in the ``# text`` line (in order, skipping white space); a multiword
token's words split its characters by their forms. The fast tokenizer's offsets then give every
token its characters: a token belongs to the word holding its first non-space character; special
tokens ([CLS], [SEP], BOS — zero-width offsets) and tokens of white space only belong to no word.
Alignment fails — ``AlignmentError`` with the reason, for the run's list — when a form is not found
where the text continues, a multiword token's words do not spell it, a word gets no token of its
own (a token spans it and its neighbour, e.g. ``cannot`` = ``can`` + ``not`` as one token), or
TransformerLens's tokens are not the tokenizer's (optionally after one prepended BOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tl_normmix.corpus.conllu import Sentence

__all__ = ["Aligned", "AlignmentError", "align", "word_spans"]


class AlignmentError(ValueError):
    """A sentence whose words cannot be mapped to tokens (the message says why)."""


@dataclass(frozen=True)
class Aligned:
    """A sentence on the model's tokens: ``piece_word[t]`` is the word of token ``t`` (-1: none)."""

    sentence: Sentence
    tokens: tuple[int, ...]
    piece_word: tuple[int, ...]
    special: tuple[bool, ...]
    strings: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.tokens)


def word_spans(sentence: Sentence) -> list[tuple[int, int]]:
    """The ``[start, end)`` characters of every word in ``sentence.text``."""
    text = sentence.text
    spans: list[tuple[int, int]] = []
    pos = 0
    for surface in sentence.surfaces:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if not text.startswith(surface.form, pos):
            raise AlignmentError(
                f"{sentence.where}: the form {surface.form!r} (word {surface.first + 1}) is not "
                f"where the # text line continues (character {pos}: {text[pos : pos + 20]!r})"
            )
        forms = [w.form for w in sentence.words[surface.first : surface.last + 1]]
        if len(forms) > 1 and "".join(forms) != surface.form:
            raise AlignmentError(
                f"{sentence.where}: the words {forms} of the multiword token {surface.form!r} do "
                "not spell it, so its characters cannot be split between them"
            )
        for form in forms:
            spans.append((pos, pos + len(form)))
            pos += len(form)
    return spans


def align(sentence: Sentence, tokenizer: Any, tl_tokens: Sequence[int]) -> Aligned:
    """Align ``sentence`` with ``tl_tokens`` (TransformerLens's tokens of its text)."""
    spans = word_spans(sentence)
    text = sentence.text
    owner = [-1] * len(text)
    for word, (start, end) in enumerate(spans):
        owner[start:end] = [word] * (end - start)
    encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    offsets = [tuple(o) for o in encoded["offset_mapping"]]
    tl = [int(t) for t in tl_tokens]
    if tl == ids:
        shift = 0
    elif tl[1:] == ids:
        shift = 1  # TransformerLens prepended the BOS token
    else:
        raise AlignmentError(
            f"{sentence.where}: TransformerLens's tokens of the text are not the tokenizer's "
            f"({len(tl)} vs {len(ids)} tokens)"
        )
    special_ids = set(getattr(tokenizer, "all_special_ids", []))
    piece_word = [-1] * shift
    special = [True] * shift
    for token, (start, end) in zip(ids, offsets, strict=True):
        is_special = start == end and token in special_ids
        first = next((c for c in range(start, end) if not text[c].isspace()), None)
        piece_word.append(-1 if is_special or first is None else owner[first])
        special.append(is_special)
    counts = [0] * len(spans)
    for word in piece_word:
        if word >= 0:
            counts[word] += 1
    for word, count in enumerate(counts):
        if count == 0:
            raise AlignmentError(
                f"{sentence.where}: word {word + 1} {sentence.words[word].form!r} has no token "
                "of its own (a token spans it and its neighbour)"
            )
    strings = tuple(tokenizer.decode([t]) for t in tl)
    return Aligned(sentence, tuple(tl), tuple(piece_word), tuple(special), strings)
