"""The scopes tl_normmix computes, and what each one needs from the cache.

A *scope* names one token-to-token map (METHODS.md §1–3) and the decomposition ``Stage`` it is.
Each stage reads cache *roles* (``pattern``, ``v``, ``resid_pre``, ``ln2.scale``, ...) that depend
on the block's layout; the model adapter turns roles into the hook names of a given model, which
is how ``hook_filter`` keeps only the hooks the scopes need. Scopes a layout cannot support are
refused with the reason (``UnsupportedScopeError``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tl_normmix.decompose.blocks import MULTIPLIER, BlockLayout, Stage

__all__ = [
    "SCOPES",
    "THROUGH_FF",
    "WHOLE_LAYER_SCOPES",
    "Scope",
    "UnsupportedScopeError",
    "check_roles",
    "resolve_scopes",
    "scope_roles",
    "stage_of",
]


class UnsupportedScopeError(NotImplementedError):
    """A scope that the model's block structure cannot support."""


@dataclass(frozen=True)
class Scope:
    name: str
    stage: Stage
    has_heads: bool  # whether a per-head map exists (maps.heads[name])
    method: str  # where METHODS.md defines it
    description: str


SCOPES: dict[str, Scope] = {
    s.name: s
    for s in (
        Scope("attn_w", Stage.WEIGHTS, True, "§1", "attention weights α; head mean"),
        Scope("attn_n", Stage.ATTN, True, "§1", "‖Σ_h α^h_ij f^h(x_j)‖"),
        Scope("attnres_w", Stage.WEIGHTS_RES, False, "§2", "0.5·ᾱ + 0.5·I"),
        Scope("attnres_n", Stage.ATTN_RES, False, "§2", "‖Σ_h α f + δ x‖"),
        Scope(
            "attnresln_n",
            Stage.ATTN_RES_LN,
            False,
            "§2",
            "‖g_i(Σ_h α f + δ x)‖ with the norm(s) that read attn + x (the FF input)",
        ),
        Scope(
            "attnreslnff_n",
            Stage.FF,
            False,
            "§3",
            "‖IG_ij‖: the feed-forward output split by integrated gradients (FF-only map)",
        ),
        Scope("attnreslnffres_n", Stage.FF_RES, False, "§3", "‖IG_ij + residual parts‖ (+RES2)"),
        Scope("attnreslnffresln_n", Stage.OUT, False, "§3", "post-LN: ‖g_i(IG_ij + parts)‖ (+LN2)"),
        Scope("layer_n", Stage.OUT, False, "§3", "the whole block output, split by source"),
        Scope(
            "globenc_n",
            Stage.GLOBENC,
            False,
            "§4",
            "GlobEnc (post-LN): ‖g2_i(g1_i(Σ_h α f + δ x))‖, LN2 without the feed-forward block",
        ),
        Scope(
            "alti",
            Stage.ALTI,
            True,
            "§4",
            "ALTI: max(0, ‖y_i‖₁ − ‖y_i − T_i(x_j)‖₁), rows normalised; y the attention "
            "sublayer's resultant (per head: information-flow routes)",
        ),
        Scope(
            "vz",
            Stage.VALUE_ZEROING,
            False,
            "§4",
            "value zeroing: 1 − cos(block output with v_j zeroed, block output), rows normalised",
        ),
    )
}

#: Whole-layer scopes through the feed-forward block, in execution order (METHODS §3).
WHOLE_LAYER_SCOPES = ("attnreslnff_n", "attnreslnffres_n", "attnreslnffresln_n", "layer_n")

_ATTENTION = frozenset({"pattern", "v", "attn_out"})


def stage_of(scope: Scope, layout: BlockLayout) -> Stage:
    """The stage ``scope`` is in ``layout``, or ``UnsupportedScopeError`` with the reason."""
    if scope.stage is Stage.VALUE_ZEROING:
        raise UnsupportedScopeError(
            f"Scope {scope.name!r} is an intervention (one edited block per source), not a map of "
            "a cache: use nm.value_zeroing(model, tokens)."
        )
    reason = layout.unsupported(scope.stage)
    if scope.name == "attnreslnffresln_n" and not layout.post:
        reason = (
            f"no norm follows the second residual inside a {layout.name} block, whose output is "
            "'attnreslnffres_n' (also called 'layer_n')"
        )
    if reason is not None:
        alternative = {
            Stage.ATTN_RES_LN: "Use 'attnres_n' here",
            Stage.FF: "Use 'layer_n' (the block output)",
            Stage.FF_RES: "Use 'layer_n' (the block output)",
        }.get(scope.stage, "Use 'layer_n' (the block output)")
        raise UnsupportedScopeError(
            f"Scope {scope.name!r} is not defined for {layout.name} blocks: {reason}. "
            f"{alternative}."
        )
    return scope.stage


def _scales(*chains: tuple[str, ...]) -> frozenset[str]:
    return frozenset(f"{n}.scale" for chain in chains for n in chain)


def scope_roles(scope: Scope, layout: BlockLayout) -> frozenset[str]:
    """The cache roles ``scope`` reads in blocks of ``layout`` (the maps' own inputs)."""
    stage = stage_of(scope, layout)
    if stage in (Stage.WEIGHTS, Stage.WEIGHTS_RES):
        return frozenset({"pattern"})
    if stage is Stage.ATTN:
        return _ATTENTION
    if stage in (Stage.ATTN_RES, Stage.ATTN_RES_LN, Stage.ALTI):
        pre, post = layout.chains(stage)
        return _ATTENTION | {"resid_pre"} | _scales(pre, post)
    if stage is Stage.GLOBENC:  # the block output's hooks too: the self-check rebuilds LN2's input
        pre, post = layout.chains(stage)
        roles = _ATTENTION | {"resid_pre", "resid_post"} | _scales(pre, post)
        return roles | {"mlp_out", "post_in"} if layout.has_mlp else roles
    roles = _ATTENTION | {"resid_pre", "resid_post"}
    if layout.has_mlp:
        roles |= {"mlp_out"}
    if layout.post and not layout.parallel and layout.has_mlp:
        roles |= {"post_in"}
    # attn_in too: the whole-model decomposition (decompose_model) splits the attention input
    chains = (
        layout.attn_in,
        layout.attn_out,
        layout.mid,
        layout.mlp_in,
        layout.mlp_out,
        layout.post,
    )
    return roles | _scales(*chains)


#: Stages whose maps rest on the tensors after the feed-forward block (checked through it).
THROUGH_FF = frozenset({Stage.FF, Stage.FF_RES, Stage.OUT, Stage.GLOBENC})


def check_roles(scopes: Iterable[Scope], layout: BlockLayout) -> frozenset[str]:
    """Roles the self-check reads besides the maps' own (each used only where the model has it):
    the scales, inputs and outputs of the norms the maps use up to the feed-forward input (and,
    for whole-layer scopes, after it), the feed-forward input and the activation hooks."""
    stages = {stage_of(s, layout) for s in scopes}
    if stages <= {Stage.WEIGHTS, Stage.WEIGHTS_RES, Stage.ATTN}:
        return frozenset()
    whole = bool(stages & THROUGH_FF)
    chains = [layout.attn_out, layout.mid, layout.mlp_in]
    if whole:
        chains += [layout.mlp_out, layout.post]
    roles = {
        f"{name}.{part}"
        for chain in chains
        for name in chain
        if name != MULTIPLIER
        for part in ("scale", "in", "out")
    }
    if layout.has_mlp and whole:
        roles |= {"mlp_in", "mlp_pre", "mlp_pre_linear", "mlp_post"}
    return frozenset(roles)


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
