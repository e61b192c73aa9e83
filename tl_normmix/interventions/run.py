"""What every intervention shares: the metric's contract, one clean forward that caches what the
edits read (``prepare``), read-only capture hooks, and where each edge exists per batch row."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from tl_normmix.interventions.edges import Edge
from tl_normmix.maps.mask import check_attention_mask, check_tokens
from tl_normmix.models.editing import Editor, reads_hidden

__all__ = ["Metric", "RunInputs", "capture", "check_metric", "prepare", "resolve_rows"]


class Metric(Protocol):
    """``metric(out) -> [batch]``: one value per batch row of the model's output (logits
    ``[batch, pos, vocab]``; the last block's output ``[batch, pos, d_model]`` when wrapped with
    ``nm.on_hidden_states``)."""

    def __call__(self, out: Tensor, /) -> Tensor: ...


@dataclass
class RunInputs:
    """Tokens, padding and the clean run's quantities an intervention reads."""

    tokens: Tensor  # [batch, pos]
    mask: Tensor  # [batch, pos] bool
    attention_mask: Tensor | None  # as given (passed to the model)
    clean_out: Tensor  # logits or final hidden states
    clean_metric: Tensor  # [batch]
    cache: dict[str, Tensor]  # clean hooks (pattern, v, z, resid_pre) of the needed layers


def prepare(
    ed: Editor,
    tokens: Tensor,
    metric: Metric,
    layers: Sequence[int],
    attention_mask: Tensor | None,
) -> RunInputs:
    """One clean forward caching what edits of ``layers`` read, and the clean metric."""
    tokens = check_tokens(tokens).to(ed.device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    if attention_mask is not None:
        mask = check_attention_mask(attention_mask, tuple(tokens.shape)).to(ed.device)
    names = sorted(frozenset(ed.clean_hooks(layers)))
    cache: dict[str, Tensor] = {}
    with torch.no_grad():
        out = ed.run(
            tokens,
            [(name, capture(cache, name)) for name in names],
            attention_mask=attention_mask,
            hidden=reads_hidden(metric),
        )
    clean = check_metric(metric, out, tokens.shape[0])
    return RunInputs(tokens, mask, attention_mask, out, clean, cache)


def capture(cache: dict[str, Tensor], name: str) -> Callable[[Tensor, Any], None]:
    """A read-only hook storing its tensor under ``name`` (aliases keep the asked name). It
    returns None, so hook points that convert shapes leave the model's tensor untouched."""

    def keep(tensor: Tensor, hook: Any) -> None:
        cache[name] = tensor.detach()

    return keep


def check_metric(metric: Metric, out: Tensor, batch: int) -> Tensor:
    value = metric(out)
    if not isinstance(value, Tensor) or tuple(value.shape) != (batch,):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"metric must map the model output {tuple(out.shape)} to one value per batch row "
            f"({batch},), got {shape}. E.g. lambda logits: logits[:, -1].log_softmax(-1)[:, t]."
        )
    return value.detach().float()


def resolve_rows(
    edges: Sequence[Edge], mask: Tensor, causal: bool
) -> list[dict[int, tuple[int, int]]]:
    """Per edge: ``{batch row: (i, j)}`` absolute positions where the edge exists (positions
    count the row's real tokens; negatives from its last real token)."""
    real = [row.nonzero().flatten().tolist() for row in mask]
    out = []
    for edge in edges:
        rows: dict[int, tuple[int, int]] = {}
        for b, positions in enumerate(real):
            n = len(positions)
            if not (-n <= edge.receiver < n and -n <= edge.source < n):
                continue
            i, j = positions[edge.receiver], positions[edge.source]
            if causal and j > i:
                continue
            rows[b] = (i, j)
        out.append(rows)
    return out
