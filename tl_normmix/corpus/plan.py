"""The plan of a corpus run: its sentences in fixed chunks, and the fingerprint a resume must match.

Sentences are numbered in the order of the files given (``max_sentences`` keeps the first ones);
chunk ``c`` holds ids ``[c·chunk_size, (c+1)·chunk_size)``. The fingerprint holds everything that
changes a chunk's numbers — model and weights hash, dtype, versions, scopes, chunk and batch
size, exemplars kept, truncation, the corpus files' hashes and sentence counts, the alignment
policy — and a resume with another fingerprint is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tl_normmix.corpus.config import CorpusConfig
from tl_normmix.corpus.conllu import POLICY, Sentence, read_conllu

__all__ = ["SCHEMA", "Plan", "fingerprint", "make_plan", "mismatch", "weights_hash"]

SCHEMA = 2  # 2: exemplars need EXEMPLAR_MIN_WORDS words


@dataclass(frozen=True)
class Plan:
    sentences: tuple[Sentence, ...]
    chunk_size: int
    files: tuple[dict[str, Any], ...]

    @property
    def n_chunks(self) -> int:
        return -(-len(self.sentences) // self.chunk_size)

    def chunk(self, c: int) -> list[tuple[int, Sentence]]:
        start = c * self.chunk_size
        ids = range(start, min(start + self.chunk_size, len(self.sentences)))
        return [(i, self.sentences[i]) for i in ids]

    def chunk_sizes(self) -> list[int]:
        return [len(self.chunk(c)) for c in range(self.n_chunks)]


def make_plan(
    files: Sequence[str | os.PathLike[str]], chunk_size: int, max_sentences: int | None = None
) -> Plan:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}.")
    if not files:
        raise ValueError("No CoNLL-U file given.")
    sentences: list[Sentence] = []
    described = []
    for file in files:
        path = Path(file)
        read = read_conllu(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        described.append({"file": path.name, "sha256": digest, "sentences": len(read)})
        sentences.extend(read)
    if max_sentences is not None:
        if max_sentences < 1:
            raise ValueError(f"max_sentences must be ≥ 1, got {max_sentences}.")
        sentences = sentences[:max_sentences]
    return Plan(tuple(sentences), chunk_size, tuple(described))


def weights_hash(model: Any) -> str:
    """SHA-256 over the parameters and buffers the maps depend on — the embeddings and the blocks
    (names, dtypes, shapes, values). Output heads are left out: an encoder loaded without its
    trained head gets a freshly initialised one at every load (MiniLM's ``mlm_head``)."""
    digest = hashlib.sha256()
    state: dict[str, Any] = {}
    for part in ("embed", "pos_embed", "blocks"):
        module = getattr(model, part, None)
        if module is not None:
            state |= {f"{part}.{k}": v for k, v in module.state_dict().items()}
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def fingerprint(
    model: Any, model_ref: str, plan: Plan, scopes: Sequence[str], config: CorpusConfig
) -> dict[str, Any]:
    """What a run's numbers depend on: the model and its weights, versions, scopes, the
    ``analysis`` fields of ``config``, the corpus and the alignment policy."""
    dtype = next(iter(model.parameters())).dtype
    return {
        "schema": SCHEMA,
        "model": model_ref,
        "weights_sha256": weights_hash(model),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": {p: _version(p) for p in ("torch", "transformer-lens", "tl_normmix")},
        "scopes": list(scopes),
        **config.analysis(),
        "corpus": list(plan.files),
        "sentences": len(plan.sentences),
        "alignment_policy": POLICY,
    }


def mismatch(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The fingerprint fields that differ."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
