"""The corpus statistics of one sentence, for many maps at once (METHODS §6).

Pure tensor code: the input is a stack of ``M`` token maps ``[M, N, N]`` of one sentence (every
layer and head of every scope, in any order) and the sentence's alignment; the output is the
sentence's *partial sums* — each statistic of the corpus is a ratio of two corpus-wide sums, so
chunks and machines merge by addition. Each map row is first divided by its total, so weights and
norms are both shares of what the row receives (a no-op for attention weights).

* **Word maps** (Clark et al. 2019): the map *to* a word sums its tokens' columns, the row *of* a
  word is the mean of its tokens' rows; special tokens are left out.
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
    "batch_sums",
    "sentence_sums",
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

    piece_word: Int[Tensor, " pos"]  # word of each token, -1: none
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
    """Partial sums of a batch of sentences (float64 on the maps' device), and per sentence
    the exemplar scores."""

    clark_correct: Float[Tensor, "map 2 rel"]
    clark_count: Float[Tensor, " rel"]
    offset_correct: Float[Tensor, "6 rel"]
    special: Float[Tensor, "map 4"]
    special_count: Float[Tensor, " 4"]  # receiving words of sentences where the kind exists
    pos: Float[Tensor, "map upos"]
    dependency: Float[Tensor, "map 3"]
    distance: Float[Tensor, " map"]
    rows: Float[Tensor, " map"]
    entropy: Float[Tensor, " map"]
    entropy_rows: Float[Tensor, " map"]
    exemplar_score: Float[Tensor, "sentence map 3"]  # nan: no candidate
    exemplar_row: Int[Tensor, "sentence map 3"]


def _one_hot(index: Tensor, size: int) -> Tensor:
    """``[..., size]`` float64; rows of negative indices are zero."""
    hot = torch.nn.functional.one_hot(index.clamp_min(0), size).double()
    return hot * (index >= 0)[..., None]


def _pad(values: list[Tensor], length: int, fill: int | bool) -> Tensor:
    out = torch.full((len(values), length), fill, dtype=values[0].dtype)
    for b, v in enumerate(values):
        out[b, : v.shape[0]] = v
    return out


def sentence_sums(maps: Float[Tensor, "map pos pos"], labels: SentenceLabels) -> SentenceSums:
    """The partial sums of METHODS §6 for every map of one sentence (see the module docstring)."""
    return batch_sums(maps[None], [labels])


def batch_sums(
    maps: Float[Tensor, "sentence map pos pos"], labels: list[SentenceLabels]
) -> SentenceSums:
    """``sentence_sums`` of a right-padded batch, summed over its sentences (the module
    docstring has the statistics; positions and words beyond a sentence's own are padding)."""
    device = maps.device
    _, m, n, _ = maps.shape
    causal = labels[0].causal
    n_tok = torch.tensor([lab.piece_word.shape[0] for lab in labels], device=device)
    n_word = torch.tensor([lab.n_words for lab in labels], device=device)
    w = max(int(n_word.max()), 1)
    word = _pad([lab.piece_word for lab in labels], n, -1).to(device)  # [b, pos]
    special = _pad([lab.special for lab in labels], n, False).to(device)
    head = _pad([lab.head for lab in labels], w, -1).to(device)  # [b, word]
    relation = _pad([lab.relation for lab in labels], w, -1).to(device)
    upos = _pad([lab.upos for lab in labels], w, -1).to(device)
    positions = torch.arange(n, device=device)
    real = positions[None] < n_tok[:, None]  # [b, pos]
    word_real = torch.arange(w, device=device)[None] < n_word[:, None]  # [b, word]
    is_word = word >= 0

    a = maps.double()
    total = a.sum(-1, keepdim=True)
    a = torch.where(total > 0, a / total.clamp_min(1e-300), torch.zeros_like(a))
    columns = _one_hot(word, w).transpose(1, 2)  # [b, word, pos]
    rows = columns / columns.sum(-1, keepdim=True).clamp_min(1)
    word_rows = rows[:, None] @ a  # [b, map, word, pos]
    word_map = word_rows @ columns.transpose(1, 2)[:, None]  # [b, map, word, word]

    # Relation accuracy (both directions) and the offset baseline.
    rel_hot = _one_hot(relation, len(RELATIONS))  # [b, word, rel]
    rel_hot[..., RELATIONS.index("all")] = word_real.double()
    eye = torch.eye(w, dtype=torch.bool, device=device)
    blocked = (eye[None] | ~word_real[:, None, :])[:, None]  # [b, 1, word, word]
    several = (n_word > 1)[:, None, None]
    correct = []
    for direction in (word_map, word_map.transpose(2, 3)):
        predicted = direction.masked_fill(blocked, float("-inf")).argmax(-1)  # [b, map, word]
        hit = ((predicted == head[:, None]) & several).double()
        correct.append(torch.einsum("bmw,bwr->mr", hit, rel_hot))
    clark_correct = torch.stack(correct, 1)
    clark_count = rel_hot.sum((0, 1))
    index = torch.arange(w, device=device)[None]
    last_word = (n_word - 1).clamp_min(0)[:, None]
    offset_correct = torch.stack(
        [
            torch.einsum(
                "bw,bwr->r",
                (torch.minimum((index + k).clamp_min(0), last_word) == head).double(),
                rel_hot,
            )
            for k in OFFSETS
        ]
    )

    # Special-token and punctuation share per receiving word.
    last = (n_tok - 1).clamp_min(0)
    at_last = word_rows.gather(-1, last[:, None, None, None].expand(-1, m, w, 1))[..., 0]
    exists = torch.stack(
        [
            special[:, 0] & (not causal),
            special.gather(1, last[:, None])[:, 0] & (n_tok > 1),
            torch.full_like(special[:, 0], causal),
            torch.ones_like(special[:, 0]),
        ],
        -1,
    ).double()  # [b, kind]
    punct_word = upos == UPOS.index("PUNCT")
    punct_tokens = is_word & punct_word.gather(1, word.clamp_min(0))
    punct = (word_rows * punct_tokens[:, None, None, :]).sum(-1)
    per_kind = torch.stack([word_rows[..., 0], at_last, word_rows[..., 0], punct], -1)
    special_sum = torch.einsum("bmwk,bk->mk", per_kind, exists)
    special_count = (exists * n_word[:, None]).sum(0)

    # Vig & Belinkov: token rows of words, first and special columns left out, renormalised.
    row_ok = is_word & (positions[None] > 0)  # [b, pos]
    keep = ~special & real & (positions[None] > 0)
    kept = a * keep[:, None, None, :]
    mass = kept.sum(-1)  # [b, map, pos]
    has_mass = (mass > 0) & row_ok[:, None]
    share = torch.where(
        has_mass[..., None], kept / mass.clamp_min(1e-300)[..., None], torch.zeros_like(kept)
    )
    tok_upos = torch.where(is_word, upos.gather(1, word.clamp_min(0)), -1)
    pos_sum = torch.einsum("bmij,bju->mu", share, _one_hot(tok_upos, len(UPOS)))
    tok_head = torch.where(is_word, head.gather(1, word.clamp_min(0)), -2)  # head word of token
    is_head = (word[:, None, :] == tok_head[:, :, None]) & is_word[:, None, :]
    is_dependent = (
        (tok_head[:, None, :] == word[:, :, None]) & is_word[:, None, :] & is_word[:, :, None]
    )
    arcs = torch.stack([is_head, is_dependent, is_head | is_dependent], 1).double()
    per_row_dep = torch.einsum("bmij,bvij->bmiv", share, arcs)  # [b, map, pos, 3]
    dependency = per_row_dep.sum((0, 2))
    gap = (positions[:, None] - positions[None, :]).double()
    per_row_distance = (share * gap).sum(-1)  # [b, map, pos]
    distance = per_row_distance.sum((0, 2))
    rows_used = has_mass.double().sum((0, 2))
    first_share = a[..., 0]  # [b, map, pos]
    plogp = torch.where(share > 0, share * share.clamp_min(1e-300).log(), torch.zeros_like(share))
    entropy_ok = has_mass & (first_share <= FIRST_TOKEN_CUTOFF)
    entropy = (-plogp.sum(-1) * entropy_ok).sum((0, 2))
    entropy_rows = entropy_ok.double().sum((0, 2))

    # Exemplars: per sentence and map, the mean of three row statistics and the best row.
    per_row = torch.stack([per_row_dep[..., 2], per_row_distance, first_share], -1)
    candidate = row_ok[:, None, :, None]  # [b, 1, pos, 1]
    count = row_ok.sum(-1).double()[:, None, None]
    score = (per_row * candidate).sum(2) / count.clamp_min(1)  # [b, map, 3]
    best = per_row.masked_fill(~candidate, float("-inf")).argmax(2)
    eligible = (row_ok.any(-1) & (n_word >= EXEMPLAR_MIN_WORDS))[:, None, None]
    score = torch.where(eligible, score, torch.full_like(score, float("nan")))
    return SentenceSums(
        clark_correct=clark_correct,
        clark_count=clark_count,
        offset_correct=offset_correct,
        special=special_sum,
        special_count=special_count,
        pos=pos_sum,
        dependency=dependency,
        distance=distance,
        rows=rows_used,
        entropy=entropy,
        entropy_rows=entropy_rows,
        exemplar_score=score,
        exemplar_row=best,
    )
