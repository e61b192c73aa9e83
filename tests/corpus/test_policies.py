"""The word policies of corpus runs: ``tokenization="words"`` (Clark et al.'s protocol: each word
tokenised on its own) equals an independent re-implementation of Clark's head-finding on the same
sentences; ``alignment="shared"`` gives a token that spans several words to each of them (its
column split equally, its row whole) and keeps sentences that ``"strict"`` fails. Every result
records its policies."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data import EWT_DEV
from helpers.tiny_models import _word_tokenizer

import tl_normmix as nm
from tl_normmix.corpus.alignment import AlignmentError, align, align_words
from tl_normmix.corpus.chunk import sentence_labels
from tl_normmix.corpus.conllu import read_conllu
from tl_normmix.corpus.statistics import RELATIONS

MWT = """# sent_id = s1
# text = t10 t11t12 t13 .
1\tt10\t_\tPRON\t_\t_\t2\tnsubj\t_\t_
2-3\tt11t12\t_\t_\t_\t_\t_\t_\t_\t_
2\tt11\t_\tVERB\t_\t_\t0\troot\t_\t_
3\tt12\t_\tPART\t_\t_\t2\tadvmod\t_\t_
4\tt13\t_\tNOUN\t_\t_\t2\tobj\t_\t_
5\t.\t_\tPUNCT\t_\t_\t2\tpunct\t_\t_

"""


@pytest.fixture
def mwt(tmp_path):
    path = tmp_path / "mwt.conllu"
    path.write_text(MWT, encoding="utf-8")
    return read_conllu(path)[0]


def test_a_token_spanning_two_words_fails_strict_and_is_shared(mwt):
    """``t11t12`` is one (unknown) token for the words ``t11`` and ``t12``."""
    tokenizer = _word_tokenizer()
    ids = tokenizer(mwt.text)["input_ids"]
    with pytest.raises(AlignmentError, match="word 3 't12' has no token of its own"):
        align(mwt, tokenizer, ids, "strict")
    aligned = align(mwt, tokenizer, ids, "shared")
    assert [aligned.words_of(t) for t in range(len(aligned))] == [(0,), (1, 2), (3,), (4,)]
    labels = sentence_labels(aligned, causal=False)
    torch.testing.assert_close(
        labels.columns,
        torch.tensor(
            [[1, 0, 0, 0], [0, 0.5, 0, 0], [0, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
            dtype=torch.float64,
        ),
    )  # the shared token's column halved between its words, its row whole for each
    torch.testing.assert_close(labels.rows, (labels.columns > 0).double())
    assert labels.piece_word.tolist() == [0, 1, 3, 4]  # the owner: the word of its first char


def test_words_protocol_tokenises_each_word_on_its_own(mwt):
    tokenizer = _word_tokenizer()
    aligned = align_words(mwt, tokenizer, bos=None)
    assert [tokenizer.decode([t]) for t in aligned.tokens] == ["t10", "t11", "t12", "t13", "[UNK]"]
    assert aligned.piece_word == (0, 1, 2, 3, 4)
    with_bos = align_words(mwt, tokenizer, bos=1)
    assert with_bos.tokens[0] == 1 and with_bos.piece_word[0] == -1 and with_bos.special[0]


@pytest.mark.real
def test_words_protocol_on_a_contraction():
    """EWT's ``don't`` is the words ``do`` + ``n't``: tokenised apart under Clark's protocol,
    where the text's ``don`` would belong to ``do`` and cover the ``n`` of ``n't``."""
    model = nm.load_model("all-MiniLM-L6-v2")
    sentence = next(s for s in read_conllu(EWT_DEV) if any(w.form == "n't" for w in s.words))
    aligned = align_words(sentence, model.tokenizer, bos=None)
    strings = [model.tokenizer.decode([t]) for t in aligned.tokens]
    assert strings[0] == "[CLS]" and strings[-1] == "[SEP]"
    k = next(i for i, w in enumerate(sentence.words) if w.form == "n't")
    pieces = [s for s, w in zip(strings, aligned.piece_word, strict=True) if w == k]
    assert "".join(p.replace("##", "") for p in pieces) == "n't"


def _clark_reference(model, sentences):
    """Clark et al.'s head finding, written out independently: every word tokenised on its own
    between [CLS] and [SEP]; the attention *to* a word sums its tokens' columns, the attention
    *from* a word averages its tokens' rows; a word's predicted head is the other word it attends
    to most; accuracy per universal relation (and "all", the root counted and never right)."""
    tokenizer = model.tokenizer
    correct: dict[tuple[int, int, str], int] = defaultdict(int)
    count: dict[str, int] = defaultdict(int)
    for sentence in sentences:
        ids, owner = [tokenizer.cls_token_id], [-1]
        for k, word in enumerate(sentence.words):
            pieces = tokenizer(word.form if k == 0 else " " + word.form, add_special_tokens=False)[
                "input_ids"
            ]
            ids += pieces
            owner += [k] * len(pieces)
        ids.append(tokenizer.sep_token_id)
        owner.append(-1)
        with torch.no_grad():
            _, cache = model.run_with_cache(torch.tensor([ids]))
        n_words = len(sentence.words)
        tokens_of = [[t for t, o in enumerate(owner) if o == k] for k in range(n_words)]
        for layer in range(model.cfg.n_layers):
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0].double().numpy()
            for head in range(model.cfg.n_heads):
                a = pattern[head]
                word_map = np.array(
                    [[a[tokens_of[i]][:, tokens_of[j]].sum(1).mean() for j in range(n_words)]
                     for i in range(n_words)]
                )  # fmt: skip
                np.fill_diagonal(word_map, -np.inf)
                for d, word in enumerate(sentence.words):
                    relation = word.deprel if word.deprel in RELATIONS else "other"
                    hit = word.head >= 0 and int(word_map[d].argmax()) == word.head
                    correct[(layer, head, relation)] += hit
                    correct[(layer, head, "all")] += hit
        for word in sentence.words:
            count[word.deprel if word.deprel in RELATIONS else "other"] += 1
            count["all"] += 1
    return correct, count


@pytest.mark.real
def test_words_protocol_equals_a_reimplementation_of_clark(tmp_path):
    model = nm.load_model("all-MiniLM-L6-v2")
    sentences = read_conllu(EWT_DEV)[:25]
    config = nm.corpus.CorpusConfig(
        tokenization="words", max_sentences=25, batch_size=5, progress=False
    )
    res = nm.corpus.analyse(model, EWT_DEV, tmp_path / "run", ("attn_w",), config)
    assert res.policy["tokenization"] == "words" and res.policy["alignment"] == "strict"
    assert res.summary().set_index("status").sentences.to_dict() == {"analysed": 25}
    correct, count = _clark_reference(model, sentences)
    table = res.relation_accuracy("attn_w")
    table = table[(table.direction == "dep->head") & (table["head"] >= 0)]
    checked = 0
    for row in table.itertuples():
        expected = correct[(row.layer, row.head, row.relation)] / count[row.relation]
        assert row.count == count[row.relation], row
        assert abs(row.accuracy - expected) < 1e-12, (row, expected)
        checked += 1
    assert checked >= 6 * 12 * 10  # every layer and head, ten relations or more


@pytest.mark.real
def test_shared_alignment_keeps_smollm2_sentences():
    """SmolLM2's BPE merges punctuation across words (``."``, ``),``): strict alignment fails
    those sentences, shared alignment keeps all but under 1%."""
    from tl_normmix.corpus.chunk import ChunkAnalyser

    model = nm.load_model("SmolLM2-135M")
    sentences = read_conllu(EWT_DEV)[:400]
    failed = {}
    for alignment in ("strict", "shared"):
        analyser = ChunkAnalyser(model, ("attn_w",), alignment=alignment)
        failed[alignment] = sum(analyser.prepare(s)[1] == "alignment_failed" for s in sentences)
    assert failed["strict"] >= 8 and failed["shared"] < 0.01 * len(sentences), failed


def test_the_policies_enter_the_fingerprint(hf_root, tmp_path):
    from helpers.corpus_fixtures import corpus_model, write_conllu

    model = corpus_model("gpt2", hf_root)
    corpus = write_conllu(tmp_path / "c.conllu", n=6)
    out = tmp_path / "o"
    base = dict(chunk_size=3, batch_size=3, progress=False)
    nm.corpus.analyse(model, corpus, out, ("attn_w",), nm.corpus.CorpusConfig(**base))
    with pytest.raises(ValueError, match="differs in: tokenization"):
        config = nm.corpus.CorpusConfig(tokenization="words", **base)
        nm.corpus.analyse(model, corpus, out, ("attn_w",), config)
    assert Path(out / "manifest.json").exists()
