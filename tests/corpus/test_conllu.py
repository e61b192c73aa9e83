"""CoNLL-U reading: syntactic words, multiword tokens, empty nodes, and malformed input named by
file and line."""

from __future__ import annotations

import pytest

from tl_normmix.corpus import CorpusFormatError, conllu_texts, read_conllu

SENTENCE = """# sent_id = a
# text = I don't know.
1\tI\tI\tPRON\t_\t_\t4\tnsubj\t_\t_
2-3\tdon't\t_\t_\t_\t_\t_\t_\t_\t_
2\tdo\tdo\tAUX\t_\t_\t4\taux\t_\t_
3\tn't\tnot\tPART\t_\t_\t4\tadvmod\t_\t_
4\tknow\tknow\tVERB\t_\t_\t0\troot\t_\tSpaceAfter=No
4.1\tknow\tknow\tVERB\t_\t_\t_\t_\t4:conj\t_
5\t.\t.\tPUNCT\t_\t_\t4\tpunct\t_\t_

# sent_id = b
1\tCats\tcat\tNOUN\t_\t_\t2\tnsubj:pass\t_\t_
2\tsleep\tsleep\tVERB\t_\t_\t0\troot\t_\tSpaceAfter=No
3\t.\t.\tPUNCT\t_\t_\t2\tpunct\t_\t_
"""


def test_conllu_texts(tmp_path):
    path = tmp_path / "a.conllu"
    path.write_text(
        "# sent_id = 1\n# text = The cat sat.\n1\tThe\t_\n\n"
        "# text = A dog = a friend.\n1\tA\t_\n\n",
        encoding="utf-8",
    )
    assert conllu_texts(path) == ["The cat sat.", "A dog = a friend."]
    assert conllu_texts(path, limit=1) == ["The cat sat."]


def test_words_multiword_tokens_and_empty_nodes(tmp_path):
    path = tmp_path / "s.conllu"
    path.write_text(SENTENCE, encoding="utf-8")
    first, second = read_conllu(path)
    assert [w.form for w in first.words] == ["I", "do", "n't", "know", "."]  # 4.1 ignored
    assert [w.head for w in first.words] == [3, 3, 3, -1, 3]  # 0-based, root = -1
    assert [(s.form, s.first, s.last) for s in first.surfaces][1] == ("don't", 1, 2)
    assert first.line == 1 and first.where.endswith("s.conllu:1")
    assert second.text == "Cats sleep."  # rebuilt from the forms and SpaceAfter=No
    assert second.words[0].deprel == "nsubj"  # subtype folded


@pytest.mark.parametrize(
    ("bad", "line", "message"),
    [
        ("1\tCats\tcat\tNOUN\t_\t_\t2\tnsubj\t_", 3, "10 tab-separated fields"),
        ("1\tCats\tcat\tNOUN\t_\t_\tx\tnsubj\t_\t_", 3, "head"),
        ("1\tCats\tcat\tNOUN\t_\t_\t7\tnsubj\t_\t_", 3, "outside the sentence"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, bad, line, message):
    path = tmp_path / "bad.conllu"
    good = "2\tsleep\tsleep\tVERB\t_\t_\t0\troot\t_\t_"
    path.write_text(f"# sent_id = x\n# text = Cats sleep\n{bad}\n{good}\n", encoding="utf-8")
    with pytest.raises(CorpusFormatError, match=rf"bad.conllu:{line}: .*{message}"):
        read_conllu(path)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.conllu"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(CorpusFormatError, match="no sentence"):
        read_conllu(empty)
    with pytest.raises(CorpusFormatError, match="no such CoNLL-U file"):
        read_conllu(tmp_path / "missing.conllu")
