"""The corpus statistics of one sentence, for many maps at once (methods.md#corpus-statistics).

Pure tensor code: the input is a stack of ``M`` token maps ``[M, N, N]`` of one sentence (every
layer and head of every scope, in any order) and the sentence's alignment; the output is the
sentence's *partial sums* — each statistic of the corpus is a ratio of two corpus-wide sums, so
chunks and machines merge by addition. Each map row is first divided by its total, so weights and
norms are both shares of what the row receives (a no-op for attention weights).

* **Word maps** (Clark et al. 2019): the map *to* a word sums its tokens' columns, the row *of* a
  word is the mean of its tokens' rows; special tokens are left out. A token several words share
  (alignment ``"shared"``) gives each of them an equal part of its column and its whole row.
* **Relation accuracy**: ``dep→head`` predicts for each word the other word it attends to most,
  ``head→dep`` the other word that attends most to it; correct when that is its gold head. The
  root's gold head is ROOT, never predicted (counted in "all", as Clark's code does). Baseline:
  the word at a fixed offset ``k ∈ {−3…2}``, clipped to the sentence.
* **Special-token share** (Clark §3): per receiving word, the share on [CLS] (position 0 of an
  encoder), on the last special token ([SEP]), on the first token (decoders) and on ``PUNCT``.
* **Vig & Belinkov 2019** (token level, word features copied to the word's tokens): rows of word
  tokens; the first token's column and special tokens' columns left out and each row renormalised
  over the rest (``α̃``); POS share ``Σα̃·[upos(j) = t]``, dependency alignment
  ``Σα̃·[arc(i, j)]`` (``j`` is ``i``'s head / ``i`` is ``j``'s head / either), distance
  ``Σα̃·(i − j)``, entropy ``−Σα̃ log α̃`` over rows with at most 90 % on the first token.
* **Exemplar scores**: per map, the sentence's mean of a row statistic (dependency alignment
  "either", distance, first-token share) and the row that maximises it; sentences of fewer than
  ``EXEMPLAR_MIN_WORDS`` words are no candidates (in a two-word sentence every row is an arc).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "DIRECTIONS",
    "EXEMPLAR_MIN_WORDS",
    "EXEMPLAR_STATISTICS",
    "KINDS",
    "OFFSETS",
    "RELATIONS",
    "UPOS",
    "VARIANTS",
    "SentenceLabels",
    "SentenceSums",
    "sentence_sums",
    "word_matrices",
]

RELATIONS = (  # the 37 universal relations, then unknown labels and all
    "acl",
    "advcl",
    "advmod",
    "amod",
    "appos",
    "aux",
    "case",
    "cc",
    "ccomp",
    "clf",
    "compound",
    "conj",
    "cop",
    "csubj",
    "dep",
    "det",
    "discourse",
    "dislocated",
    "expl",
    "fixed",
    "flat",
    "goeswith",
    "iobj",
    "list",
    "mark",
    "nmod",
    "nsubj",
    "nummod",
    "obj",
    "obl",
    "orphan",
    "parataxis",
    "punct",
    "reparandum",
    "root",
    "vocative",
    "xcomp",
    "other",
    "all",
)
UPOS = (  # the 17 universal parts of speech
    "ADJ",
    "ADP",
    "ADV",
    "AUX",
    "CCONJ",
    "DET",
    "INTJ",
    "NOUN",
    "NUM",
    "PART",
    "PRON",
    "PROPN",
    "PUNCT",
    "SCONJ",
    "SYM",
    "VERB",
    "X",
)
DIRECTIONS = ("dep->head", "head->dep")
OFFSETS = (-3, -2, -1, 0, 1, 2)
KINDS = ("cls", "sep", "first", "punct")
VARIANTS = ("head", "dependent", "either")
EXEMPLAR_STATISTICS = ("dependency_alignment", "distance", "first")
EXEMPLAR_MIN_WORDS = 6
FIRST_TOKEN_CUTOFF = 0.9  # entropy: rows with more on the first token are left out (V&B)


@dataclass(frozen=True)
class SentenceLabels:
    """The alignment and gold annotation of one sentence, as tensors."""

    piece_word: Int[Tensor, " pos"]  # the word owning each token, -1: none
    columns: Float[Tensor, "word pos"]  # each token's column's share for each word (sums to 1)
    rows: Float[Tensor, "word pos"]  # each word's row: the mean of its tokens' rows
    special: Bool[Tensor, " pos"]
    head: Int[Tensor, " word"]  # gold head word, -1: root
    relation: Int[Tensor, " word"]  # index into RELATIONS
    upos: Int[Tensor, " word"]  # index into UPOS, -1: unknown
    causal: bool

    @property
    def n_words(self) -> int:
        return int(self.head.shape[0])


@dataclass
class SentenceSums:
    """Partial sums of one sentence (float64 on the maps' device)."""

    clark_correct: Float[Tensor, "map 2 rel"]
    clark_count: Float[Tensor, " rel"]
    offset_correct: Float[Tensor, "6 rel"]
    special: Float[Tensor, "map 4"]  # nan where the kind does not exist
    words: int
    pos: Float[Tensor, "map upos"]
    dependency: Float[Tensor, "map 3"]
    distance: Float[Tensor, " map"]
    rows: Float[Tensor, " map"]
    entropy: Float[Tensor, " map"]
    entropy_rows: Float[Tensor, " map"]
    exemplar_score: Float[Tensor, "map 3"]
    exemplar_row: Int[Tensor, "map 3"]


def word_matrices(
    token_words: list[tuple[int, ...]], n_words: int
) -> tuple[Float[Tensor, "word pos"], Float[Tensor, "word pos"]]:
    """``(columns, rows)`` of the word maps from the words each token belongs to: a token's
    column is divided equally among its words, each word's row is the mean of its tokens'."""
    columns = torch.zeros(n_words, len(token_words), dtype=torch.float64)
    for t, words in enumerate(token_words):
        for word in words:
            columns[word, t] = 1.0 / len(words)
    member = (columns > 0).double()
    rows = member / member.sum(-1, keepdim=True).clamp_min(1.0)
    return columns, rows


def _one_hot(index: Tensor, size: int) -> Tensor:
    out = torch.zeros(index.shape[0], size, dtype=torch.float64, device=index.device)
    valid = index >= 0
    out[valid.nonzero().squeeze(-1), index[valid]] = 1.0
    return out


def sentence_sums(maps: Float[Tensor, "map pos pos"], labels: SentenceLabels) -> SentenceSums:
    """The partial sums of methods.md#corpus-statistics for every map of one sentence (see the
    module docstring)."""
    device = maps.device
    a = maps.double()
    total = a.sum(-1, keepdim=True)
    a = torch.where(total > 0, a / total.clamp_min(1e-300), torch.zeros_like(a))
    m, n, _ = a.shape
    w = labels.n_words
    word = labels.piece_word.to(device)
    is_word = word >= 0
    columns = labels.columns.to(device)  # [word, pos]
    word_rows = labels.rows.to(device) @ a  # [map, word, pos]
    word_map = word_rows @ columns.T  # [map, word, word]

    # Relation accuracy (both directions) and the offset baseline.
    head = labels.head.to(device)
    relation = labels.relation.to(device)
    rel_hot = _one_hot(relation, len(RELATIONS))
    rel_hot[:, RELATIONS.index("all")] = 1.0
    eye = torch.eye(w, dtype=torch.bool, device=device)
    correct = []
    for direction in (word_map, word_map.transpose(1, 2)):
        scores = direction.masked_fill(eye, float("-inf")) if w > 1 else direction
        predicted = scores.argmax(-1)  # [map, word]
        correct.append(((predicted == head) & (w > 1)).double() @ rel_hot)
    clark_correct = torch.stack(correct, 1)
    clark_count = rel_hot.sum(0)
    index = torch.arange(w, device=device)
    offset_correct = torch.stack(
        [((index + k).clamp(0, w - 1) == head).double() @ rel_hot for k in OFFSETS]
    )

    # Special-token and punctuation share per receiving word.
    special = labels.special.to(device)
    nan = torch.full((m, w), float("nan"), dtype=torch.float64, device=device)
    cls = word_rows[:, :, 0] if special[0] and not labels.causal else nan
    last_special = bool(special[-1]) and n > 1
    sep = word_rows[:, :, -1] if last_special else nan
    first = word_rows[:, :, 0] if labels.causal else nan
    upos = labels.upos.to(device)
    punct_word = upos == UPOS.index("PUNCT")
    punct_tokens = is_word & punct_word[word.clamp_min(0)]
    punct = word_rows[:, :, punct_tokens].sum(-1)
    special_sum = torch.stack([cls, sep, first, punct], -1).sum(1)

    # Vig & Belinkov: token rows of words, first and special columns left out, renormalised.
    keep = ~special.clone()
    keep[0] = False
    row_index = (is_word & (torch.arange(n, device=device) > 0)).nonzero().squeeze(-1)
    kept = a[:, row_index][:, :, keep]  # [map, row, col]
    mass = kept.sum(-1, keepdim=True)
    has_mass = mass.squeeze(-1) > 0
    share = torch.where(mass > 0, kept / mass.clamp_min(1e-300), torch.zeros_like(kept))
    col_index = keep.nonzero().squeeze(-1)
    col_word = word[col_index]
    row_word = word[row_index]
    tok_upos = torch.where(col_word >= 0, upos[col_word.clamp_min(0)], -1)
    pos_sum = (share @ _one_hot(tok_upos, len(UPOS))).sum(1)
    row_head = head[row_word]  # [row]
    col_head = torch.where(col_word >= 0, head[col_word.clamp_min(0)], -2)
    is_head = (col_word[None, :] == row_head[:, None]) & (col_word[None, :] >= 0)
    is_dependent = (col_head[None, :] == row_word[:, None]) & (col_word[None, :] >= 0)
    arcs = torch.stack([is_head, is_dependent, is_head | is_dependent]).double()  # [3, row, col]
    per_row_dep = torch.einsum("mrc,vrc->mrv", share, arcs)
    dependency = per_row_dep.sum(1)
    gap = (row_index[:, None] - col_index[None, :]).double()
    per_row_distance = (share * gap).sum(-1)
    distance = per_row_distance.sum(-1)
    rows_used = has_mass.double().sum(-1)
    first_share = a[:, row_index, 0]  # [map, row]
    plogp = torch.where(share > 0, share * share.clamp_min(1e-300).log(), torch.zeros_like(share))
    entropy_ok = has_mass & (first_share <= FIRST_TOKEN_CUTOFF)
    entropy = (-plogp.sum(-1) * entropy_ok).sum(-1)
    entropy_rows = entropy_ok.double().sum(-1)

    # Exemplars: per map, the sentence's mean of three row statistics and the best row.
    per_row = torch.stack([per_row_dep[..., 2], per_row_distance, first_share], -1)  # [m, r, 3]
    if row_index.numel() and w >= EXEMPLAR_MIN_WORDS:
        score = per_row.mean(1)
        best = row_index[per_row.argmax(1)]
    else:
        score = torch.full((m, 3), float("nan"), dtype=torch.float64, device=device)
        best = torch.zeros(m, 3, dtype=torch.long, device=device)
    return SentenceSums(
        clark_correct=clark_correct,
        clark_count=clark_count,
        offset_correct=offset_correct,
        special=special_sum,
        words=w,
        pos=pos_sum,
        dependency=dependency,
        distance=distance,
        rows=rows_used,
        entropy=entropy,
        entropy_rows=entropy_rows,
        exemplar_score=score,
        exemplar_row=best,
    )
