"""The statistics of one sentence against a direct re-implementation of Clark et al.'s protocol
and Vig & Belinkov's definitions (loops over words and tokens, no shared code), on random maps
and random annotations: encoders and decoders, split words, special tokens, non-word tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tl_normmix.corpus.statistics import (
    KINDS,
    OFFSETS,
    RELATIONS,
    UPOS,
    SentenceLabels,
    sentence_sums,
    word_matrices,
)


def _case(seed: int, causal: bool):
    rng = np.random.default_rng(seed)
    n_words = int(rng.integers(2, 7))
    pieces = [int(rng.integers(1, 3)) for _ in range(n_words)]
    piece_word = [-1]  # BOS / [CLS]
    for w, k in enumerate(pieces):
        piece_word += [w] * k
        if rng.random() < 0.2:
            piece_word.append(-1)  # a token of white space only
    special = [True] + [False] * (len(piece_word) - 1)
    if not causal:
        piece_word.append(-1)
        special.append(True)  # [SEP]
    n = len(piece_word)
    head = [int(rng.integers(-1, n_words)) for _ in range(n_words)]
    head = [h if h != w else -1 for w, h in enumerate(head)]
    relation = [int(rng.integers(0, len(RELATIONS) - 1)) for _ in range(n_words)]
    upos = [int(rng.integers(0, len(UPOS))) for _ in range(n_words)]
    maps = rng.random((3, n, n))
    if causal:
        maps = np.tril(maps)
    maps[1] *= 5.0  # a norm-like map: rows do not sum to 1
    columns, rows = word_matrices([(w,) if w >= 0 else () for w in piece_word], n_words)
    labels = SentenceLabels(
        torch.tensor(piece_word),
        columns,
        rows,
        torch.tensor(special),
        torch.tensor(head),
        torch.tensor(relation),
        torch.tensor(upos),
        causal,
    )
    return maps, labels, piece_word, special, head, relation, upos


def _reference(maps, piece_word, special, head, relation, upos, causal):
    """Loops, straight from methods.md#corpus-statistics."""
    m, n, _ = maps.shape
    w = len(head)
    a = maps / maps.sum(-1, keepdims=True)
    pieces = [[t for t in range(n) if piece_word[t] == k] for k in range(w)]
    out = {
        "clark": np.zeros((m, 2, len(RELATIONS))),
        "offset": np.zeros((len(OFFSETS), len(RELATIONS))),
        "special": np.zeros((m, 4)),
        "pos": np.zeros((m, len(UPOS))),
        "dep": np.zeros((m, 3)),
        "dist": np.zeros(m),
        "ent": np.zeros(m),
        "ent_rows": np.zeros(m),
        "rows": np.zeros(m),
    }
    all_ = RELATIONS.index("all")
    for k in range(m):
        word_map = np.zeros((w, w))
        for x in range(w):
            for y in range(w):
                word_map[x, y] = np.mean([sum(a[k, i, j] for j in pieces[y]) for i in pieces[x]])
        for d, wm in enumerate((word_map, word_map.T)):
            for x in range(w):
                best = max((y for y in range(w) if y != x), key=lambda y: wm[x, y])
                if best == head[x]:
                    out["clark"][k, d, relation[x]] += 1
                    out["clark"][k, d, all_] += 1
        for x in range(w):
            row = np.mean([a[k, i] for i in pieces[x]], axis=0)
            cls = row[0] if special[0] and not causal else math.nan
            sep = row[-1] if special[-1] else math.nan
            first = row[0] if causal else math.nan
            punct = sum(
                row[t]
                for t in range(n)
                if piece_word[t] >= 0 and upos[piece_word[t]] == UPOS.index("PUNCT")
            )
            out["special"][k] += [cls, sep, first, punct]
        for i in range(1, n):
            if piece_word[i] < 0:
                continue
            cols = [j for j in range(1, n) if not special[j]]
            mass = sum(a[k, i, j] for j in cols)
            if mass <= 0:
                continue
            out["rows"][k] += 1
            h = 0.0
            for j in cols:
                p = a[k, i, j] / mass
                wj = piece_word[j]
                if wj >= 0:
                    out["pos"][k, upos[wj]] += p
                    is_head = head[piece_word[i]] == wj
                    is_dep = head[wj] == piece_word[i]
                    out["dep"][k] += [p * is_head, p * is_dep, p * (is_head or is_dep)]
                out["dist"][k] += p * (i - j)
                h -= p * math.log(p) if p > 0 else 0.0
            if a[k, i, 0] <= 0.9:
                out["ent"][k] += h
                out["ent_rows"][k] += 1
    for o, off in enumerate(OFFSETS):
        for x in range(w):
            if min(max(x + off, 0), w - 1) == head[x]:
                out["offset"][o, relation[x]] += 1
                out["offset"][o, all_] += 1
    return out


@pytest.mark.parametrize("causal", [True, False], ids=["decoder", "encoder"])
@pytest.mark.parametrize("seed", range(6))
def test_sums_equal_the_direct_protocol(seed, causal):
    maps, labels, *rest = _case(seed, causal)
    got = sentence_sums(torch.tensor(maps), labels)
    ref = _reference(maps, *rest, causal)
    np.testing.assert_allclose(got.clark_correct.numpy(), ref["clark"])
    np.testing.assert_allclose(got.offset_correct.numpy(), ref["offset"])
    np.testing.assert_allclose(got.special.numpy(), ref["special"], rtol=1e-10)
    np.testing.assert_allclose(got.pos.numpy(), ref["pos"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.dependency.numpy(), ref["dep"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.distance.numpy(), ref["dist"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.entropy.numpy(), ref["ent"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.entropy_rows.numpy(), ref["ent_rows"])
    np.testing.assert_allclose(got.rows.numpy(), ref["rows"])
    counts = np.bincount(rest[3], minlength=len(RELATIONS)).astype(float)
    counts[RELATIONS.index("all")] = len(rest[3])
    np.testing.assert_allclose(got.clark_count.numpy(), counts)
    assert KINDS == ("cls", "sep", "first", "punct")


def test_a_perfect_head_attention_scores_one():
    """A map where every word attends only to its gold head: dep→head accuracy 1 on non-roots."""
    piece_word = torch.tensor([-1, 0, 1, 1, 2, 3])
    head = torch.tensor([1, -1, 1, 2])
    n = 6
    a = torch.full((1, n, n), 1e-3)
    for t, w in enumerate(piece_word.tolist()):
        if w >= 0 and head[w] >= 0:
            for j in (piece_word == head[w]).nonzero().flatten().tolist():
                a[0, t, j] = 1.0
    columns, rows = word_matrices([(w,) if w >= 0 else () for w in piece_word.tolist()], 4)
    labels = SentenceLabels(
        piece_word,
        columns,
        rows,
        torch.tensor([True] + [False] * 5),
        head,
        torch.tensor([0, RELATIONS.index("root"), 1, 1]),
        torch.zeros(4, dtype=torch.long),
        causal=False,
    )
    sums = sentence_sums(a, labels)
    all_ = RELATIONS.index("all")
    assert sums.clark_correct[0, 0, all_] == 3  # every word but the root
    assert sums.clark_correct[0, 0, 1] == 2
