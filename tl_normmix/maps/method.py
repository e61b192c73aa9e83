"""What a method of the registry is: one object per scope that owns everything about it.

A ``Method`` holds its name, a one-line description, where the docs define it, the layouts it
applies to (``refusal`` says why it does not apply elsewhere), the cache roles it reads, whether
it has per-head maps (and how they are built), its own typed options (a dataclass) and the
*kernel* that computes it. Methods that share work share a kernel: one call of the kernel per
layer computes every requested method of that kernel (e.g. one pass of quadratic forms serves all
norm-based attention scopes). The registry itself is ``tl_normmix.maps.scopes``.

A kernel reads one layer (``LayerInputs``: the adapter's tensors, the padding mask, the masked
pattern) and returns ``KernelOutput``: maps, mixing ratios and completeness residuals by scope
name, plus what it leaves for per-head maps built later (``state``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from jaxtyping import Bool, Float
from torch import Tensor

from tl_normmix.decompose.blocks import MULTIPLIER, BlockLayout, LayerTensors, NormSpec, Stage

__all__ = [
    "LAYOUTS",
    "HeadFactors",
    "Kernel",
    "KernelOutput",
    "LayerInputs",
    "Method",
    "UnsupportedScopeError",
    "stage_roles",
]


class UnsupportedScopeError(NotImplementedError):
    """A scope that the model's block structure cannot support."""


@dataclass(frozen=True)
class LayerInputs:
    """What a kernel reads of one layer: the adapter's tensors, the run's padding mask, the
    pattern with padding masked (None where the scopes read none), the chunk sizes of the
    memory policy for this layer's shapes, and — at the model's last layer — its final norm."""

    tensors: LayerTensors
    mask: Bool[Tensor, "batch pos"]
    pattern: Float[Tensor, "batch head_index query_pos key_pos"] | None
    value_norms: bool  # the caller asked for ‖f^h(x_j)‖
    rows: Callable[[int], int]  # rows per chunk of a pass whose rows hold this many bytes
    last: bool = False  # the model's last layer
    final_norm: NormSpec | None = None  # the norm after the last block (last layer only)


@dataclass
class KernelOutput:
    """A kernel's results for one layer, by scope name; ``state[name]``: what the scope's
    per-head maps are later built from (``Method.heads``)."""

    maps: dict[str, Float[Tensor, "batch query_pos key_pos"]] = field(default_factory=dict)
    ratios: dict[str, Float[Tensor, "batch query_pos"]] = field(default_factory=dict)
    completeness: dict[str, Float[Tensor, "batch pos"]] = field(default_factory=dict)
    value_norms: Float[Tensor, "batch head_index pos"] | None = None
    state: dict[str, Any] = field(default_factory=dict)


class Kernel(Protocol):
    """Computes the requested ``methods`` of one kernel for one layer, each with its options."""

    def __call__(
        self, layer: LayerInputs, methods: Mapping[str, Method], options: Mapping[str, Any]
    ) -> KernelOutput: ...


@dataclass(frozen=True)
class HeadFactors:
    """What one layer keeps to build a scope's per-head maps on first access: the masked pattern,
    the value norms ``‖f^h(x_j)‖`` and what the scope's kernel left for them (``state``)."""

    pattern: Float[Tensor, "batch head_index query_pos key_pos"] | None
    value_norms: Float[Tensor, "batch head_index pos"] | None
    mask: Bool[Tensor, "batch pos"]
    state: Any = None


#: A per-layer product of a method's per-head parts: ``(factors, options) -> tensor``.
HeadBuilder = Callable[[HeadFactors, Any], Tensor]

#: The self-check a method's maps rest on: none (weights, pure attention parts), the attention
#: block up to the feed-forward input, or through the feed-forward block.
Check = Literal["none", "attention", "through_ff"]

_ATTENTION_ROLES = frozenset({"pattern", "v", "attn_out"})


@dataclass(frozen=True)
class Method:
    """One scope or method of the registry (see the module docstring).

    ``heads``: builds one layer's per-head map ``[batch, head, query, key]`` (None: the scope
    has none); ``extras``: further per-layer products of the same parts by name (ALTI's
    ``residual_share``); ``computed_by``: the entry point that computes it where that is not
    ``mixing_maps`` (refused there, listed for discovery); ``reads``: the stage whose cache roles
    a method that decomposes no stage itself reads (value zeroing: the block output's).
    """

    name: str
    description: str
    docs: str  # the docs page and section that define it
    stage: Stage | None
    kernel: Kernel | None
    check: Check = "attention"
    options: type | None = None
    heads: HeadBuilder | None = None
    extras: Mapping[str, HeadBuilder] = field(default_factory=dict)
    computed_by: str = "mixing_maps"
    refuse: Callable[[BlockLayout], str | None] | None = None  # beyond the stage's own refusal
    alternative: str = "Use 'layer_n' (the block output)"
    reads: Stage | None = None  # the stage whose roles it reads, where it is no stage itself

    @property
    def has_heads(self) -> bool:
        return self.heads is not None

    def refusal(self, layout: BlockLayout) -> str | None:
        """Why this method does not apply to blocks of ``layout`` (None if it does)."""
        if self.stage is not None:
            reason = layout.unsupported(self.stage)
            if reason is not None:
                return reason
        return self.refuse(layout) if self.refuse is not None else None

    def check_layout(self, layout: BlockLayout) -> None:
        """``UnsupportedScopeError`` naming the reason where this method does not apply."""
        if self.kernel is None:
            raise UnsupportedScopeError(
                f"Scope {self.name!r} is not a map of one cached run: use {self.computed_by}."
            )
        reason = self.refusal(layout)
        if reason is not None:
            raise UnsupportedScopeError(
                f"Scope {self.name!r} is not defined for {layout.name} blocks: {reason}. "
                f"{self.alternative}."
            )

    def roles(self, layout: BlockLayout) -> frozenset[str]:
        """The cache roles the method reads in blocks of ``layout`` (its maps' own inputs)."""
        self.check_layout(layout)
        stage = self.stage or self.reads
        assert stage is not None, f"{self.name}: a method reads a stage's roles"
        return stage_roles(stage, layout)

    def layouts(self) -> dict[str, str | None]:
        """Each layout of ``LAYOUTS`` → None where the method applies, else the reason."""
        return {name: self.refusal(layout) for name, layout in LAYOUTS.items()}

    def default_options(self) -> Any:
        """An instance of the method's options with their defaults (None if it has none)."""
        return self.options() if self.options is not None else None


def _scales(*chains: tuple[str, ...]) -> frozenset[str]:
    return frozenset(f"{n}.scale" for chain in chains for n in chain)


def stage_roles(stage: Stage, layout: BlockLayout) -> frozenset[str]:
    """The cache roles a decomposition ``stage`` reads in blocks of ``layout``."""
    if stage in (Stage.WEIGHTS, Stage.WEIGHTS_RES):
        return frozenset({"pattern"})
    if stage is Stage.ATTN:
        return _ATTENTION_ROLES
    if stage in (Stage.ATTN_RES, Stage.ATTN_RES_LN, Stage.ALTI):
        pre, post = layout.chains(stage)
        return _ATTENTION_ROLES | {"resid_pre"} | _scales(pre, post)
    if stage is Stage.GLOBENC:  # the block output's hooks too: the self-check rebuilds LN2's input
        pre, post = layout.chains(stage)
        roles = _ATTENTION_ROLES | {"resid_pre", "resid_post"} | _scales(pre, post)
        return roles | {"mlp_out", "post_in"} if layout.has_mlp else roles
    roles = _ATTENTION_ROLES | {"resid_pre", "resid_post"}
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


def check_roles(methods: list[Method], layout: BlockLayout) -> frozenset[str]:
    """Roles the self-check reads besides the maps' own (each used only where the model has it):
    the scales, inputs and outputs of the norms the maps use up to the feed-forward input (and,
    for maps through the feed-forward block, after it), the feed-forward input and the activation
    hooks."""
    checks = {m.check for m in methods}
    if checks <= {"none"}:
        return frozenset()
    whole = "through_ff" in checks
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


#: The block layouts every method is described against (``Method.layouts``, the docs' table):
#: one of each kind ``BlockLayout.name`` distinguishes.
LAYOUTS: dict[str, BlockLayout] = {
    layout.name: layout
    for layout in (
        BlockLayout(attn_in=("ln1",), mlp_in=("ln2",)),
        BlockLayout(mid=("ln1",), post=("ln2",)),
        BlockLayout(parallel=True, attn_in=("ln1",), mlp_in=("ln2",)),
        BlockLayout(parallel=True, attn_in=("ln1",), mlp_in=("ln1",)),
        BlockLayout(
            attn_in=("ln1",), attn_out=("ln1_post",), mlp_in=("ln2",), mlp_out=("ln2_post",)
        ),
        BlockLayout(attn_out=("ln1_post",), mlp_out=("ln2_post",)),
        BlockLayout(
            attn_in=("ln1",), attn_out=(MULTIPLIER,), mlp_in=("ln2",), mlp_out=(MULTIPLIER,)
        ),
        BlockLayout(attn_in=("ln1",), has_mlp=False),
    )
}
