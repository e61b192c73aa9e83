"""Roles → sources: where each tensor of ``LayerTensors`` comes from on a model.

A *source* is one hook, or a function of hooks and weights where no hook holds the tensor
(TransformerLens 2.x's RMSNorm output, OPT-350m's post-norm input, sandwich blocks' pure branch
outputs). One builder per model class TransformerLens offers — the 4.x bridge (its hooks found by
the probe run), 2.x ``HookedTransformer`` and ``HookedEncoder``; roles a model cannot provide are
left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tl_normmix.decompose.blocks import MULTIPLIER, BlockLayout
from tl_normmix.models.probe import Probe
from tl_normmix.models.structure import Structure

__all__ = ["Source", "sources"]

_B = "blocks.{l}."


@dataclass(frozen=True)
class Source:
    """Where a role's tensor comes from: one hook, or ``combine`` of several (``{l}`` = layer)."""

    hooks: tuple[str, ...]
    combine: Callable[[list[Tensor], int], Tensor] | None = None
    by_layer: tuple[tuple[str, ...], ...] | None = None  # per-layer hooks where layers differ

    def names(self, layer: int) -> list[str]:
        hooks = self.by_layer[layer] if self.by_layer is not None else self.hooks
        return [h.format(l=layer) for h in hooks]


def sources(
    model: Any, structure: Structure, layout: BlockLayout, found: Probe | None
) -> dict[str, Source]:
    if structure.family == "bridge":
        assert found is not None
        return _bridge_sources(model, structure, layout, found)
    if structure.family == "encoder":
        return _encoder_sources(model, structure)
    return _hooked_sources(model, structure, layout)


def _bridge_sources(
    model: Any, structure: Structure, layout: BlockLayout, found: Probe
) -> dict[str, Source]:
    ok = found.cached

    def hook(suffix: str) -> Source | None:
        return Source((_B + suffix,)) if suffix in ok else None

    out: dict[str, Source | None] = {
        "pattern": Source((_B + "attn.hook_pattern",)),
        "v": Source((_B + "attn.hook_v",), _heads_second if found.v_heads_first else None),
        "attn_out": Source((_B + "attn.o.hook_out",)),
        "resid_pre": Source((_B + "hook_resid_pre",)),
    }
    for norm in (n for n in layout.norms if n != MULTIPLIER):
        out[f"{norm}.scale"] = Source((_B + f"{norm}.hook_scale",))
        out[f"{norm}.in"] = hook(f"{norm}.hook_in")
        out[f"{norm}.out"] = hook(f"{norm}.hook_out")
    if layout.post:
        out["resid_post"] = hook("hook_resid_post") or out[f"{layout.post[-1]}.out"]
    else:
        out["resid_post"] = hook("hook_resid_post")
    kinds = [structure.mlp_kind_of(layer) for layer in range(structure.n_layers)]
    pure = "mlp.out.hook_out"
    if structure.mlp_kind is not None:
        out["mlp_in"] = hook("mlp.hook_in")
        # the pure FF output: mlp.out.hook_out where the MLP has an output projection (BLOOM's
        # mlp.hook_out adds the residual), mlp.hook_out for a mixture of experts
        per_layer = tuple(
            (_B + (pure if f"blocks.{layer}.{pure}" in model.hook_dict else "mlp.hook_out"),)
            for layer in range(structure.n_layers)
        )
        out["mlp_out"] = Source(per_layer[0], by_layer=per_layer)
        if any(kind not in ("module", None) for kind in kinds):
            out["mlp_pre"] = hook("mlp.hook_pre")
            out["mlp_post"] = hook("mlp.hook_post")
            if "gated" in kinds:
                out["mlp_pre_linear"] = hook("mlp.hook_pre_linear")
    if layout.post:
        first = layout.post[0]
        out["post_in"] = out[f"{first}.in"]
        mlp_out = out.get("mlp_out")
        simple = not layout.mlp_in and not layout.mlp_out and out.get("mlp_in") is not None
        if out["post_in"] is None and simple and mlp_out is not None:
            # OPT-350m: caching ln2.hook_in breaks the run; its input is the FF input (the stream
            # after ln1) plus the pure FF output.
            out["post_in"] = Source(
                (_B + "mlp.hook_in", *mlp_out.hooks),
                lambda ts, _: ts[0] + ts[1],
                by_layer=tuple((_B + "mlp.hook_in", *o) for o in mlp_out.by_layer or ()),
            )
    return {role: source for role, source in out.items() if source is not None}


def _hooked_sources(model: Any, structure: Structure, layout: BlockLayout) -> dict[str, Source]:
    """TransformerLens 2.x ``HookedTransformer``: LayerNorm's ``hook_normalized`` is its output
    (γ, β included), RMSNorm's is ``x / s`` (γ not included); with sandwich norms
    ``hook_attn_out`` / ``hook_mlp_out`` are after the post-branch norms, so the pure outputs are
    rebuilt from ``hook_z`` and ``mlp.hook_post``."""
    out: dict[str, Source] = {
        "pattern": Source((_B + "attn.hook_pattern",)),
        "v": Source((_B + "attn.hook_v",)),
        "resid_pre": Source((_B + "hook_resid_pre",)),
        "resid_post": Source((_B + "hook_resid_post",)),
    }
    sandwich = bool(layout.attn_out)
    if sandwich:
        out["attn_out"] = Source(
            (_B + "attn.hook_z",), lambda ts, layer: _attn_from_z(model, ts[0], layer)
        )
    else:
        out["attn_out"] = Source((_B + "hook_attn_out",))
    for norm in layout.norms:
        out[f"{norm}.scale"] = Source((_B + f"{norm}.hook_scale",))
        out[f"{norm}.out"] = _hooked_norm_out(model, norm)
    if structure.mlp_kind is not None:
        if not sandwich:
            out["mlp_out"] = Source((_B + "hook_mlp_out",))
        elif structure.mlp_kind != "module":
            out["mlp_out"] = Source(
                (_B + "mlp.hook_post",), lambda ts, layer: _mlp_from_post(model, ts[0], layer)
            )
        if structure.mlp_kind != "module":
            out["mlp_pre"] = Source((_B + "mlp.hook_pre",))
            out["mlp_post"] = Source((_B + "mlp.hook_post",))
            if structure.mlp_kind == "gated":
                out["mlp_pre_linear"] = Source((_B + "mlp.hook_pre_linear",))
    return out


def _encoder_sources(model: Any, structure: Structure) -> dict[str, Source]:
    """TransformerLens 2.x ``HookedEncoder`` (post-LN): ``hook_resid_mid`` is LN1's input,
    ``hook_resid_post`` LN2's input and ``hook_normalized_resid_post`` the block output."""
    return {
        "pattern": Source((_B + "attn.hook_pattern",)),
        "v": Source((_B + "attn.hook_v",)),
        "attn_out": Source((_B + "hook_attn_out",)),
        "resid_pre": Source((_B + "hook_resid_pre",)),
        "resid_post": Source((_B + "hook_normalized_resid_post",)),
        "post_in": Source((_B + "hook_resid_post",)),
        "ln1.in": Source((_B + "hook_resid_mid",)),
        "ln1.scale": Source((_B + "ln1.hook_scale",)),
        "ln1.out": Source((_B + "ln1.hook_normalized",)),
        "ln2.in": Source((_B + "hook_resid_post",)),
        "ln2.scale": Source((_B + "ln2.hook_scale",)),
        "ln2.out": Source((_B + "ln2.hook_normalized",)),
        "mlp_in": Source((_B + "ln1.hook_normalized",)),
        "mlp_out": Source((_B + "hook_mlp_out",)),
        "mlp_pre": Source((_B + "mlp.hook_pre",)),
        "mlp_post": Source((_B + "mlp.hook_post",)),
    }


def _hooked_norm_out(model: Any, norm: str) -> Source:
    module = getattr(model.blocks[0], norm)
    if type(module).__name__ == "RMSNorm":  # hook_normalized is x / s: γ comes after
        return Source(
            (_B + f"{norm}.hook_normalized",),
            lambda ts, layer: ts[0] * getattr(model.blocks[layer], norm).w.detach().float(),
        )
    return Source((_B + f"{norm}.hook_normalized",))


def _heads_second(tensors: list[Tensor], layer: int) -> Tensor:
    """The MLA bridge's hook_v ``[batch, head, pos, d_head]`` as ``[batch, pos, head, d_head]``."""
    return tensors[0].transpose(1, 2)


def _attn_from_z(model: Any, z: Tensor, layer: int) -> Tensor:
    attn = model.blocks[layer].attn
    W_O = attn.W_O.detach().float()
    return torch.einsum("bphd,hdm->bpm", z, W_O) + attn.b_O.detach().float()


def _mlp_from_post(model: Any, post: Tensor, layer: int) -> Tensor:
    mlp = model.blocks[layer].mlp
    return post @ mlp.W_out.detach().float() + mlp.b_out.detach().float()
