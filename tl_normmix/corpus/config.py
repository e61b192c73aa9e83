"""``CorpusConfig``: everything a corpus run is configured by, in one place.

``nm.corpus.analyse`` takes it, the command line builds its ``corpus analyse`` options from its
fields (``cli_fields``: flag, type, choices and help come from here), and its ``analysis``
fields — the ones that change the numbers — enter the run's fingerprint, so a resumed run or
another shard is refused when they differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from tl_normmix.corpus.alignment import Alignment, Tokenization

__all__ = ["CorpusConfig", "Dtype", "Engine", "parse_shard"]

#: Where the chunks are computed: a plain loop, or a Ray Data actor pool (extra ``ray``).
Engine = Literal["local", "ray"]
#: The model's dtype in a run.
Dtype = Literal["float32", "bfloat16", "float16"]


def _option(help: str, *, analysis: bool = False, flag: str | None = None) -> Any:
    return {"help": help, "analysis": analysis, "flag": flag}


@dataclass(frozen=True)
class CorpusConfig:
    """How a corpus run is computed (``analysis`` fields enter the fingerprint).

    Attributes:
        batch_size: sentences per forward pass.
        chunk_size: sentences per committed chunk (the unit of resume and of shards).
        max_sentences: only the first N sentences of the corpus.
        top_k: exemplar sentences kept per head and statistic.
        truncate: cut sentences longer than the model's context (else they are skipped, counted).
        tokenization: ``"text"`` (the ``# text`` line, as the model reads natural text) or
            ``"words"`` (each syntactic word tokenised on its own: Clark et al.'s protocol).
        alignment: ``"strict"`` (a word without a token of its own fails the sentence) or
            ``"shared"`` (a token spanning several words belongs to each; see the alignment
            guide).
        engine: ``"local"`` or ``"ray"``.
        shard: ``"K/N"``: only the chunks whose id is K modulo N (SLURM arrays); then ``reduce``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:i]"`` (a model given by name).
        dtype: the model's dtype (a model given by name).
        restart: discard the run folder's parts and start over.
        progress: a progress bar over sentences.
        actors, cpus_per_actor, gpus_per_actor, address: the Ray engine's actor pool and cluster
            (default: start a local one).
    """

    batch_size: int = field(
        default=16, metadata=_option("sentences per forward pass", analysis=True)
    )
    chunk_size: int = field(
        default=256, metadata=_option("sentences per committed chunk", analysis=True)
    )
    max_sentences: int | None = field(
        default=None, metadata=_option("only the first N sentences (counted in the fingerprint)")
    )
    top_k: int = field(
        default=5, metadata=_option("exemplar sentences kept per head", analysis=True)
    )
    truncate: bool = field(
        default=False, metadata=_option("cut sentences longer than n_ctx", analysis=True)
    )
    tokenization: Tokenization = field(
        default="text",
        metadata=_option(
            "text: the sentence's text tokenised as natural text; words: each word on its own "
            "(Clark et al.'s protocol)",
            analysis=True,
        ),
    )
    alignment: Alignment = field(
        default="strict",
        metadata=_option(
            "strict: a word without a token of its own fails the sentence; shared: a token "
            "spanning words belongs to each of them",
            analysis=True,
        ),
    )
    engine: Engine = field(default="local", metadata=_option("where chunks are computed"))
    shard: str | None = field(
        default=None, metadata=_option("K/N: only chunks with id %% N == K; then reduce")
    )
    device: str = field(default="auto", metadata=_option("auto | cpu | cuda[:i]"))
    dtype: Dtype = field(default="float32", metadata=_option("the model's dtype"))
    restart: bool = field(default=False, metadata=_option("discard DIR's parts and start over"))
    progress: bool = field(default=True, metadata=_option("no progress bar", flag="--quiet"))
    actors: int = field(default=1, metadata=_option("--engine ray: model actors"))
    cpus_per_actor: float = field(default=1.0, metadata=_option("--engine ray: CPUs per actor"))
    gpus_per_actor: float = field(default=0.0, metadata=_option("--engine ray: GPUs per actor"))
    address: str | None = field(
        default=None, metadata=_option("--engine ray: the cluster (default: a local one)")
    )

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.top_k < 1 or self.chunk_size < 1:
            raise ValueError("batch_size, chunk_size and top_k must be ≥ 1.")
        if self.engine not in get_args(Engine):
            raise ValueError(f"engine must be 'local' or 'ray', got {self.engine!r}.")
        if self.tokenization not in get_args(Tokenization):
            raise ValueError(f"tokenization must be 'text' or 'words', got {self.tokenization!r}.")
        if self.alignment not in get_args(Alignment):
            raise ValueError(f"alignment must be 'strict' or 'shared', got {self.alignment!r}.")
        if self.dtype not in get_args(Dtype):
            raise ValueError(f"dtype must be one of {get_args(Dtype)}, got {self.dtype!r}.")
        parse_shard(self.shard)

    @property
    def shard_of(self) -> tuple[int, int] | None:
        """``shard`` as ``(K, N)``."""
        return parse_shard(self.shard)

    def analysis(self) -> dict[str, Any]:
        """The fields that change the numbers (they enter the fingerprint)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["analysis"]}


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``"K/N"`` → ``(K, N)`` with ``0 ≤ K < N``."""
    if shard is None:
        return None
    try:
        k, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ValueError(f"--shard {shard!r}: expected K/N, e.g. 0/4.") from None
    if not 0 <= k < n:
        raise ValueError(f"--shard {k}/{n}: K must be in 0…N-1.")
    return k, n
