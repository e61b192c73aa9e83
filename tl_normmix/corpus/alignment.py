"""Words of a CoNLL-U sentence ↔ the model's tokens (methods.md#corpus-statistics), under two
recorded policies.

**Tokenization.** ``"text"``: the sentence's ``# text`` line is tokenised as the model reads
natural text. ``"words"`` (Clark et al. 2019's protocol): each syntactic word is tokenised on its
own — after a space, but the first — and the pieces are joined between the model's special tokens
(``[CLS] … [SEP]``, a prepended BOS), so every word has its own tokens by construction.

**Alignment** (``"text"`` only; every surface unit is located in the ``# text`` line, a multiword
token's words split its characters by their forms). The fast tokenizer's offsets give every token
its characters; special tokens ([CLS], [SEP], BOS — zero-width offsets) and tokens of white space
only belong to no word. ``"strict"``: a token belongs to the word of its first non-space
character, and a word with no token of its own fails the sentence (``cannot`` as one token for
``can`` + ``not``). ``"shared"``: a token that spans several words belongs to all of them — its
*owner* is the word of its first character (its part of speech and arcs in the token-level
statistics), and in the word maps its column is divided equally among the words it spans while
its row counts in full for each of them; so no sentence fails for lack of a token.

Alignment fails — ``AlignmentError`` with the reason, for the run's list — when a form is not
found where the text continues, a multiword token's words do not spell it, a word gets no token
of its own (``"strict"``), or TransformerLens's tokens are not the tokenizer's (optionally after
one prepended BOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tl_normmix.corpus.conllu import Sentence

__all__ = [
    "Aligned",
    "Alignment",
    "AlignmentError",
    "Tokenization",
    "align",
    "align_words",
    "word_spans",
]

#: How a sentence becomes tokens (module docstring).
Tokenization = Literal["text", "words"]
#: What a token spanning several words belongs to (module docstring).
Alignment = Literal["strict", "shared"]


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
    #: every word each token spans, its owner first (``piece_word``); empty for no word
    token_words: tuple[tuple[int, ...], ...] = field(default=())

    def __len__(self) -> int:
        return len(self.tokens)

    def words_of(self, t: int) -> tuple[int, ...]:
        """The words token ``t`` belongs to (its owner first)."""
        if self.token_words:
            return self.token_words[t]
        return (self.piece_word[t],) if self.piece_word[t] >= 0 else ()


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


def align(
    sentence: Sentence,
    tokenizer: Any,
    tl_tokens: Sequence[int],
    alignment: Alignment = "strict",
) -> Aligned:
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
    token_words: list[tuple[int, ...]] = [()] * shift
    special = [True] * shift
    for token, (start, end) in zip(ids, offsets, strict=True):
        is_special = start == end and token in special_ids
        covered = (
            ()
            if is_special
            else tuple(dict.fromkeys(owner[c] for c in range(start, end) if owner[c] >= 0))
        )
        token_words.append(covered)
        special.append(is_special)
    piece_word = [words[0] if words else -1 for words in token_words]
    own = set(piece_word) if alignment == "strict" else {w for ws in token_words for w in ws}
    for word in range(len(spans)):
        if word not in own:
            raise AlignmentError(
                f"{sentence.where}: word {word + 1} {sentence.words[word].form!r} has no token "
                + (
                    "of its own (a token spans it and its neighbour)"
                    if alignment == "strict"
                    else "(the tokenizer dropped its characters)"
                )
            )
    if alignment == "strict":
        token_words = [(w,) if w >= 0 else () for w in piece_word]
    strings = tuple(tokenizer.decode([t]) for t in tl)
    return Aligned(
        sentence, tuple(tl), tuple(piece_word), tuple(special), strings, tuple(token_words)
    )


def align_words(sentence: Sentence, tokenizer: Any, bos: int | None) -> Aligned:
    """Clark et al.'s protocol: each syntactic word tokenised on its own (after a space, but the
    first), the pieces joined between the model's special tokens and ``bos`` (the token
    TransformerLens prepends, if it does)."""
    pieces: list[int] = []
    piece_word: list[int] = []
    for index, word in enumerate(sentence.words):
        ids = tokenizer(word.form if index == 0 else " " + word.form, add_special_tokens=False)[
            "input_ids"
        ]
        if not ids:
            raise AlignmentError(
                f"{sentence.where}: word {index + 1} {word.form!r} gives no token on its own"
            )
        pieces += ids
        piece_word += [index] * len(ids)
    prefix, suffix = _framing(tokenizer)
    framed = [*prefix, *pieces, *suffix]
    words = [-1] * len(prefix) + piece_word + [-1] * len(suffix)
    if bos is not None and (not framed or framed[0] != bos):
        framed, words = [bos, *framed], [-1, *words]
    special = tuple(w < 0 for w in words)
    strings = tuple(tokenizer.decode([t]) for t in framed)
    token_words = tuple((w,) if w >= 0 else () for w in words)
    return Aligned(sentence, tuple(framed), tuple(words), special, strings, token_words)


def _framing(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (``[CLS]`` / ``[SEP]``),
    read off its encoding of one word with and without them."""
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    framed = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(framed) - len(bare) + 1):
        if framed[start : start + len(bare)] == bare:
            return framed[:start], framed[start + len(bare) :]
    raise AlignmentError("the tokenizer's special tokens alter the words it frames")
