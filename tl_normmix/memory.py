"""One memory policy for every engine: what is free, how much one chunk of work may take, and how
many rows of work fit in it.

Rules:

* Free memory is asked of the operating system through ``psutil`` (Linux, macOS, Windows) or of
  the CUDA driver (plus the blocks PyTorch's caching allocator holds unused). Nothing else in the
  package probes the machine; the pure math (``tl_normmix.decompose``) receives chunk sizes as
  arguments.
* One chunk of work aims at ``budget()`` bytes of working memory (``DEFAULT_BUDGET_BYTES`` unless
  ``set_budget`` changed it). A long input may need more per row than the budget holds: a chunk
  never goes below its engine's minimum rows, and never above half of what is free.
* Loops that re-read a block of floats many times (ALTI's pair vectors, value zeroing's block
  tails) use blocks the CPU's cache holds, ``CACHE_BLOCK_BYTES``: bigger blocks are slower there,
  not faster.
* A chunk size the user chose is kept, unless it cannot fit in what is free: then ``MemoryError``
  names the size that would fit.

Choices are logged on ``logging.getLogger("tl_normmix")``: a chunk capped by free memory at
INFO, every chunk size at DEBUG.
"""

from __future__ import annotations

import logging

import torch

__all__ = [
    "CACHE_BLOCK_BYTES",
    "CPU_BLOCK_ROWS",
    "DEFAULT_BUDGET_BYTES",
    "block_rows",
    "budget",
    "check_fits",
    "free_bytes",
    "rows_per_chunk",
    "set_budget",
]

logger = logging.getLogger("tl_normmix")

#: Working memory one chunk of work aims at, whatever the engine.
DEFAULT_BUDGET_BYTES = 512 * 2**20

#: Blocks that a tight loop re-reads: what a CPU's cache holds.
CACHE_BLOCK_BYTES = 4 * 2**20

#: Rows of a row-chunked pass over ``N × N`` tensors on a CPU (the quadratic forms of the norm
#: maps): small blocks stay in the cache. On a GPU small chunks leave it idle between kernel
#: launches, so a chunk there fills the budget instead.
CPU_BLOCK_ROWS = 32

_budget = DEFAULT_BUDGET_BYTES


def budget() -> int:
    """The working memory one chunk of work aims at, in bytes."""
    return _budget


def set_budget(n_bytes: int | None) -> None:
    """Change the working memory per chunk (None: back to ``DEFAULT_BUDGET_BYTES``). A larger
    budget means fewer, bigger chunks: faster on a GPU, more memory everywhere."""
    global _budget
    if n_bytes is not None and n_bytes < 1:
        raise ValueError(f"The memory budget must be positive, got {n_bytes} bytes.")
    _budget = DEFAULT_BUDGET_BYTES if n_bytes is None else int(n_bytes)


def free_bytes(device: torch.device | str) -> int | None:
    """Memory free on ``device``, in bytes (None where it cannot be known: e.g. MPS)."""
    device = torch.device(device)
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + cached
    if device.type != "cpu":
        return None
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return None
    return int(psutil.virtual_memory().available)


def rows_per_chunk(
    row_bytes: int,
    rows: int,
    *,
    device: torch.device | str | None = None,
    budget_bytes: int | None = None,
    minimum: int = 1,
    chunks: int = 1,
    fixed_bytes: int = 0,
    what: str = "",
) -> int:
    """How many of ``rows`` rows of ``row_bytes`` each one chunk holds: as many as fill the budget
    (``budget_bytes``, default ``budget()``), at least ``minimum``, at most ``rows / chunks``
    (engines that skip work per chunk — the keys after a chunk's last receiver in causal models
    — want several chunks), and — where ``device`` is given and its free memory known — never
    more than fit in half of what is free beside ``fixed_bytes`` held for the whole pass."""
    target = budget() if budget_bytes is None else budget_bytes
    chunk = max(minimum, min(target // max(1, row_bytes), -(-rows // chunks)))
    if device is not None:
        free = free_bytes(device)
        if free is not None:
            fits = (free // 2 - fixed_bytes) // max(1, row_bytes)
            if fits < chunk:
                logger.info(
                    "%s: %d rows per chunk fit in half of the %.1f GiB free (budget: %d)",
                    what or "chunk",
                    max(1, fits),
                    free / 2**30,
                    chunk,
                )
            chunk = min(chunk, max(1, fits))
    chunk = max(1, min(rows, chunk))
    if what:
        logger.debug("%s: %d of %d rows per chunk (%d bytes a row)", what, chunk, rows, row_bytes)
    return chunk


def block_rows(row_bytes: int, rows: int, *, device: torch.device | str) -> int:
    """Rows per chunk of a row-chunked pass: ``CPU_BLOCK_ROWS`` on a CPU; elsewhere as many as
    fill the budget, at least that many."""
    if torch.device(device).type == "cpu":
        return min(rows, CPU_BLOCK_ROWS)
    return max(CPU_BLOCK_ROWS, budget() // max(1, row_bytes))


def check_fits(
    chunk: int,
    row_bytes: int,
    *,
    device: torch.device | str,
    fixed_bytes: int = 0,
    what: str,
) -> int:
    """A chunk size the user chose: ``chunk`` if it fits in what is free on ``device`` (or that
    is unknown), else ``MemoryError`` naming the size that would fit."""
    if chunk < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk}.")
    free = free_bytes(device)
    need = fixed_bytes + row_bytes * chunk
    if free is not None and need > free:
        fits = (free - fixed_bytes) // max(1, row_bytes)
        advice = (
            f"chunk_size={fits} would fit"
            if fits >= 1
            else "no chunk size fits: use a shorter input, a smaller batch or fewer layers"
        )
        raise MemoryError(
            f"{what}: chunk_size={chunk} needs about {need / 2**30:.1f} GiB but "
            f"{free / 2**30:.1f} GiB are free; {advice}."
        )
    return chunk
