"""Files and text in and out of the reports: output paths checked before any work, texts checked
and tokenised (never truncated silently), and pages written atomically (the file appears only
when complete)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tl_normmix.render.page import write_atomic

__all__ = ["check_output_path", "check_text", "tokenize", "write_atomic"]


def check_output_path(out: str | os.PathLike[str]) -> Path:
    """Refuse, before any work, an output path that cannot be written."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise IsADirectoryError(
            f"--out {str(out)!r} is a folder; give a file name like report.html."
        )
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Cannot write {str(out)!r}: the folder {str(folder)!r} does not exist."
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(
            f"Cannot write {str(out)!r}: the folder {str(folder)!r} is read-only."
        )
    return path


def check_text(text: str) -> str:
    """Refuse an empty (or blank) text before any work."""
    if not text.strip():
        raise ValueError("The text is empty; give some words with --text or --text-file.")
    return text


def tokenize(model: Any, text: str, *, truncate: bool = False) -> torch.Tensor:
    """``model.to_tokens(text)``, refusing an empty text or one longer than the context."""
    check_text(text)
    tokens = _to_tokens(model, text, truncate=False)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and tokens.shape[-1] > n_ctx:
        if not truncate:
            raise ValueError(
                f"The text is {tokens.shape[-1]} tokens but {model.cfg.model_name} reads at most "
                f"{n_ctx}; shorten it, or pass --truncate to keep the first {n_ctx} tokens."
            )
        tokens = _to_tokens(model, text, truncate=True)  # the tokenizer keeps special tokens
    return tokens


def _to_tokens(model: Any, text: str, *, truncate: bool) -> torch.Tensor:
    tokens = model.to_tokens(text, truncate=truncate)
    return tokens[0] if isinstance(tokens, tuple) else tokens  # HookedEncoder: (ids, types, mask)
