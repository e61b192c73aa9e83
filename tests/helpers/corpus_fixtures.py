"""Small CoNLL-U fixtures in the tiny models' vocabulary (words ``t7``…``t99``), and the tiny
model's tokenizer for TransformerLens 2.x models (which are built without one)."""

from __future__ import annotations

import random
from pathlib import Path

RELATIONS = ["nsubj", "obj", "det", "amod", "advmod", "nmod:poss", "case", "obl", "conj"]
UPOS = ["NOUN", "VERB", "DET", "ADJ", "ADV", "PRON", "ADP", "PROPN"]


def write_conllu(path: Path, n: int = 30, seed: int = 0) -> Path:
    """``n`` random projective-ish sentences of 3–9 words and a final ``.`` (PUNCT)."""
    rng = random.Random(seed)
    lines = []
    for s in range(n):
        k = rng.randint(3, 9)
        root = rng.randint(1, k)
        forms = [f"t{rng.randint(10, 90)}" for _ in range(k)]
        lines += [f"# sent_id = s{s}", "# text = " + " ".join(forms) + " ."]
        for i in range(1, k + 1):
            others = [j for j in range(1, k + 1) if j != i]
            head = 0 if i == root else (root if rng.random() < 0.6 else rng.choice(others))
            rel = "root" if head == 0 else rng.choice(RELATIONS)
            lines.append(f"{i}\t{forms[i - 1]}\t_\t{rng.choice(UPOS)}\t_\t_\t{head}\t{rel}\t_\t_")
        lines += [f"{k + 1}\t.\t_\tPUNCT\t_\t_\t{root}\tpunct\t_\t_", ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def corpus_model(family: str, hf_root: Path):
    """The tiny model of ``family`` with the word-level tokenizer on either TransformerLens."""
    from helpers import tiny_models

    case = tiny_models.Case(family, "raw")
    model = tiny_models.build(case, hf_root)
    if getattr(model, "tokenizer", None) is not None:
        return model
    # TransformerLens 2.x tiny models have no tokenizer: give one to a fresh copy (the cached
    # model is shared with tests that expect none)
    model = tiny_models.build(case, hf_root, fresh=True)
    model.tokenizer = tiny_models._word_tokenizer()
    model.cfg.tokenizer_prepends_bos = False  # what set_tokenizer would find for this tokenizer
    return model
