"""The scopes tl_normmix computes, and what each one needs from the cache.

A *scope* names one token-to-token map (METHODS.md §1–3). Each scope lists the cache *roles*
it reads (``pattern``, ``v``, ``resid_pre``, ...); the model adapter turns roles into the hook
names of a given model, which is how ``hook_filter`` keeps only the hooks the scopes need.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tl_normmix.blocks import BlockKind

__all__ = [
    "FF_SCOPES",
    "NORM_CHAINS",
    "NORM_SCOPES",
    "SCOPES",
    "WHOLE_LAYER_SCOPES",
    "Scope",
    "UnsupportedScopeError",
    "resolve_scopes",
    "scope_roles",
]


@dataclass(frozen=True)
class Scope:
    name: str
    roles: frozenset[str]  # cache roles read per layer (see tl_normmix.adapter.ROLES)
    has_heads: bool  # whether a per-head map exists (maps.heads[name])
    method: str  # where METHODS.md defines it
    description: str


_WHOLE = frozenset({"pattern", "v", "attn_out", "resid_pre", "mlp_out", "resid_post"})

SCOPES: dict[str, Scope] = {
    s.name: s
    for s in (
        Scope("attn_w", frozenset({"pattern"}), True, "§1", "attention weights α; head mean"),
        Scope(
            "attn_n", frozenset({"pattern", "v", "attn_out"}), True, "§1", "‖Σ_h α^h_ij f^h(x_j)‖"
        ),
        Scope("attnres_w", frozenset({"pattern"}), False, "§2", "0.5·ᾱ + 0.5·I"),
        Scope(
            "attnres_n",
            frozenset({"pattern", "v", "attn_out", "resid_pre"}),
            False,
            "§2",
            "‖Σ_h α f + δ x‖",
        ),
        Scope(
            "attnresln_n",
            frozenset({"pattern", "v", "attn_out", "resid_pre"}),
            False,
            "§2",
            "‖g_i(Σ_h α f + δ x)‖ with the norm that reads attn + x",
        ),
        Scope(
            "attnreslnff_n",
            _WHOLE,
            False,
            "§3",
            "‖IG_ij‖: the feed-forward output split by integrated gradients (FF-only map)",
        ),
        Scope("attnreslnffres_n", _WHOLE, False, "§3", "‖IG_ij + residual parts‖ (+RES2)"),
        Scope("attnreslnffresln_n", _WHOLE, False, "§3", "post-LN: ‖g_i(IG_ij + parts)‖ (+LN2)"),
        Scope("layer_n", _WHOLE, False, "§3", "the whole block output, split by source"),
    )
}

#: Scopes computed from norms of decomposed vectors (METHODS §1–2), by ``residual.decompose``.
NORM_SCOPES = ("attn_n", "attnres_n", "attnresln_n")

#: The norms linearised before and after the residual add, per scope and block kind (METHODS §2):
#: ``(pre, post)``. Sandwich blocks normalise the attention output before adding the residual.
NORM_CHAINS: dict[tuple[str, BlockKind], tuple[tuple[str, ...], tuple[str, ...]]] = {
    **{("attnres_n", kind): ((), ()) for kind in BlockKind},
    ("attnres_n", BlockKind.SANDWICH): (("ln1_post",), ()),
    ("attnresln_n", BlockKind.PRE_LN): ((), ("ln2",)),
    ("attnresln_n", BlockKind.POST_LN): ((), ("ln1",)),
    ("attnresln_n", BlockKind.SANDWICH): (("ln1_post",), ("ln2",)),
}


#: Whole-layer scopes through the feed-forward block, in execution order (METHODS §3), and the
#: scope of the whole block output.
FF_SCOPES = ("attnreslnff_n", "attnreslnffres_n", "attnreslnffresln_n")
WHOLE_LAYER_SCOPES = (*FF_SCOPES, "layer_n")


def _whole_layer_roles(scope: Scope, kind: BlockKind) -> frozenset[str]:
    if kind is BlockKind.PARALLEL:
        if scope.name != "layer_n":
            raise UnsupportedScopeError(
                f"Scope {scope.name!r} is not defined for parallel blocks: the feed-forward block "
                "reads LN2 of the layer input, not the attention output, so within the layer its "
                "whole output belongs to the receiving token. Use 'layer_n' (the block output)."
            )
        return scope.roles | {"ln2.scale"}
    if scope.name == "attnreslnffresln_n" and kind is not BlockKind.POST_LN:
        raise UnsupportedScopeError(
            f"Scope 'attnreslnffresln_n' exists only in post-LN blocks (BERT); in {kind.value} "
            "blocks no norm follows the second residual inside the block, whose output is "
            "'attnreslnffres_n' (also called 'layer_n')."
        )
    pre, post = NORM_CHAINS[("attnresln_n", kind)]
    extra = {f"{norm}.scale" for norm in (*pre, *post)}
    if kind is BlockKind.POST_LN:
        extra |= {"ln2.scale", "ln2.in"}
    if kind is BlockKind.SANDWICH:
        extra |= {"ln2_post.scale"}
    return scope.roles | extra


def scope_roles(scope: Scope, kind: BlockKind) -> frozenset[str]:
    """The cache roles ``scope`` reads in blocks of ``kind``."""
    if scope.name in WHOLE_LAYER_SCOPES:
        return _whole_layer_roles(scope, kind)
    if scope.name not in {name for name, _ in NORM_CHAINS}:
        return scope.roles
    if (scope.name, kind) not in NORM_CHAINS:
        raise UnsupportedScopeError(
            f"Scope {scope.name!r} is not defined for {kind.value} blocks: in parallel blocks no "
            "layer norm reads the sum of the attention output and the residual (the feed-forward "
            "block reads LN2 of the layer input). Use 'attnres_n' here."
        )
    pre, post = NORM_CHAINS[(scope.name, kind)]
    return scope.roles | {f"{norm}.scale" for norm in (*pre, *post)}


class UnsupportedScopeError(NotImplementedError):
    """A scope that the model's block structure cannot support."""


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
