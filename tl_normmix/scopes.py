"""The scopes tl_normmix computes, and what each one needs from the cache.

A *scope* names one token-to-token map (METHODS.md §1–3). Each scope lists the cache *roles*
it reads (``pattern``, ``v``, ``resid_pre``, ...); the model adapter turns roles into the hook
names of a given model, which is how ``hook_filter`` keeps only the hooks the scopes need.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["SCOPES", "Scope", "resolve_scopes"]


@dataclass(frozen=True)
class Scope:
    name: str
    roles: frozenset[str]  # cache roles read per layer (see tl_normmix.adapter.ROLES)
    has_heads: bool  # whether a per-head map exists (maps.heads[name])
    method: str  # where METHODS.md defines it
    description: str


SCOPES: dict[str, Scope] = {
    s.name: s
    for s in (
        Scope(
            "attn_w",
            frozenset({"pattern"}),
            True,
            "§1",
            "attention weights α^h_ij; layer map = mean over heads",
        ),
    )
}

#: Per-source value norms ‖f^h(x_j)‖ (METHODS §1) read these roles.
VALUE_NORM_ROLES = frozenset({"v"})


def resolve_scopes(scopes: str | Iterable[str]) -> tuple[Scope, ...]:
    """Validate scope names (a single name or several), keeping their order, without repeats."""
    names = (scopes,) if isinstance(scopes, str) else tuple(scopes)
    if not names:
        raise ValueError(f"No scope requested; valid scopes: {', '.join(SCOPES)}.")
    unknown = [n for n in names if n not in SCOPES]
    if unknown:
        raise ValueError(
            f"Unknown scope(s) {', '.join(map(repr, unknown))}; valid scopes: {', '.join(SCOPES)}."
        )
    return tuple(SCOPES[n] for n in dict.fromkeys(names))
