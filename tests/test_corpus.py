"""Sentences come from the ``# text =`` lines of a CoNLL-U file, in order."""

from tl_normmix.corpus import conllu_texts


def test_conllu_texts(tmp_path):
    path = tmp_path / "a.conllu"
    path.write_text(
        "# sent_id = 1\n# text = The cat sat.\n1\tThe\t_\n\n"
        "# text = A dog = a friend.\n1\tA\t_\n\n",
        encoding="utf-8",
    )
    assert conllu_texts(path) == ["The cat sat.", "A dog = a friend."]
    assert conllu_texts(path, limit=1) == ["The cat sat."]
