"""Words ↔ tokens: a hand-worked sentence (split words, a multiword token) on MiniLM's WordPiece
tokenizer, BOS handling on the tiny word-level tokenizer, and every failure named."""

from __future__ import annotations

import pytest
from helpers.tiny_models import _word_tokenizer

from tl_normmix.corpus import AlignmentError, align, read_conllu

HAND = """# text = I don't like unaffable cats.
1\tI\t_\tPRON\t_\t_\t4\tnsubj\t_\t_
2-3\tdon't\t_\t_\t_\t_\t_\t_\t_\t_
2\tdo\t_\tAUX\t_\t_\t4\taux\t_\t_
3\tn't\t_\tPART\t_\t_\t4\tadvmod\t_\t_
4\tlike\t_\tVERB\t_\t_\t0\troot\t_\t_
5\tunaffable\t_\tADJ\t_\t_\t6\tamod\t_\t_
6\tcats\t_\tNOUN\t_\t_\t4\tobj\t_\tSpaceAfter=No
7\t.\t_\tPUNCT\t_\t_\t4\tpunct\t_\t_
"""


@pytest.mark.real
def test_hand_worked_sentence_on_wordpiece(tmp_path):
    from transformers import AutoTokenizer

    from tl_normmix.models.loading import _packaged_path

    tokenizer = AutoTokenizer.from_pretrained(_packaged_path("all-MiniLM-L6-v2"))
    path = tmp_path / "hand.conllu"
    path.write_text(HAND, encoding="utf-8")
    sentence = read_conllu(path)[0]
    ids = tokenizer(sentence.text)["input_ids"]
    aligned = align(sentence, tokenizer, ids)
    # [CLS] i don ' t like una ##ffa ##ble cats . [SEP]
    # "don" starts in "do" (chars 2–4); "'" and "t" are in "n't" (chars 4–7)
    assert aligned.piece_word == (-1, 0, 1, 2, 2, 3, 4, 4, 4, 5, 6, -1)
    assert aligned.special == (True, *[False] * 10, True)

    path.write_text(
        HAND.replace("I don't like unaffable", "We cannot like unaffable")
        .replace("2-3\tdon't", "2-3\tcannot")
        .replace("2\tdo\t", "2\tcan\t")
        .replace("3\tn't\t", "3\tnot\t")
        .replace("1\tI\t", "1\tWe\t"),
        encoding="utf-8",
    )
    sentence = read_conllu(path)[0]
    with pytest.raises(AlignmentError, match=r"word 3 'not' has no token of its own"):
        align(sentence, tokenizer, tokenizer(sentence.text)["input_ids"])


CORPUS = """# text = t10 t11  t12 .
1\tt10\t_\tNOUN\t_\t_\t2\tnsubj\t_\t_
2\tt11\t_\tVERB\t_\t_\t0\troot\t_\t_
3\tt12\t_\tNOUN\t_\t_\t2\tobj\t_\tSpaceAfter=No
4\t.\t_\tPUNCT\t_\t_\t2\tpunct\t_\t_
"""


def test_a_prepended_bos_is_special_and_belongs_to_no_word(tmp_path):
    tokenizer = _word_tokenizer()
    path = tmp_path / "c.conllu"
    path.write_text(CORPUS, encoding="utf-8")
    sentence = read_conllu(path)[0]
    ids = tokenizer(sentence.text)["input_ids"]
    plain = align(sentence, tokenizer, ids)
    assert plain.piece_word == (0, 1, 2, 3) and not any(plain.special)
    bos = align(sentence, tokenizer, [tokenizer.bos_token_id, *ids])
    assert bos.piece_word == (-1, 0, 1, 2, 3) and bos.special == (True, False, False, False, False)
    with pytest.raises(AlignmentError, match="not the tokenizer's"):
        align(sentence, tokenizer, [*ids, 9])


def test_text_that_does_not_match_the_forms_is_named(tmp_path):
    path = tmp_path / "c.conllu"
    path.write_text(CORPUS.replace("# text = t10 t11", "# text = t10 t13"), encoding="utf-8")
    sentence = read_conllu(path)[0]
    with pytest.raises(AlignmentError, match=r"c.conllu:1: the form 't11' \(word 2\)"):
        align(sentence, _word_tokenizer(), [])
    path.write_text(
        CORPUS.replace("1\tt10", "1-2\tt10t11\t_\t_\t_\t_\t_\t_\t_\t_\n1\tt10").replace(
            "# text = t10 t11 ", "# text = t10t11 "
        ),
        encoding="utf-8",
    )
    sentence = read_conllu(path)[0]
    assert sentence.surfaces[0].form == "t10t11"
    path.write_text(
        CORPUS.replace("1\tt10", "1-2\tt10x11\t_\t_\t_\t_\t_\t_\t_\t_\n1\tt10").replace(
            "# text = t10 t11 ", "# text = t10x11 "
        ),
        encoding="utf-8",
    )
    with pytest.raises(AlignmentError, match="do not spell it"):
        align(read_conllu(path)[0], _word_tokenizer(), [])


@pytest.mark.real
def test_hand_worked_word_map_predicts_heads(tmp_path):
    """Every token attends to "like": Clark's word map (columns summed over a word's tokens,
    rows averaged, [CLS]/[SEP] left out) predicts "like" as the head of every other word —
    right for the five words that depend on it, wrong for "unaffable" (head "cats") and the
    root."""
    import torch
    from transformers import AutoTokenizer

    from tl_normmix.corpus.chunk import sentence_labels
    from tl_normmix.corpus.statistics import RELATIONS, sentence_sums
    from tl_normmix.models.loading import _packaged_path

    tokenizer = AutoTokenizer.from_pretrained(_packaged_path("all-MiniLM-L6-v2"))
    path = tmp_path / "hand.conllu"
    path.write_text(HAND, encoding="utf-8")
    sentence = read_conllu(path)[0]
    aligned = align(sentence, tokenizer, tokenizer(sentence.text)["input_ids"])
    labels = sentence_labels(aligned, causal=False)
    n = len(aligned)
    like = aligned.piece_word.index(3)
    maps = torch.full((1, n, n), 1e-3)
    maps[0, :, like] = 1.0
    sums = sentence_sums(maps, labels)
    correct = sums.clark_correct[0, 0]  # dep→head
    assert correct[RELATIONS.index("all")] == 5
    for relation in ("nsubj", "aux", "advmod", "obj", "punct"):
        assert correct[RELATIONS.index(relation)] == 1
    assert correct[RELATIONS.index("amod")] == 0 and correct[RELATIONS.index("root")] == 0
