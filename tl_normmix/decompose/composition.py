"""The block rebuilt from its parts: what every hook must hold if the layout is right.

From the block input ``r = resid_pre``, the pure attention output ``A``, the pure feed-forward
output ``M`` and each norm's cached scale, the layout (``blocks.BlockLayout``) determines every
other tensor of the block (methods.md#residual-and-layer-norm):

    sequential:  A' = attn_out(A);  h = mid(r + A');  u = mlp_in(h);  y = post(h + mlp_out(M))
    parallel:    A' = attn_out(A);  u = mlp_in(r);    y = post(r + A' + mlp_out(M))

``recompose`` returns, for each norm, the input it must read (and the output it gives, where the
rebuild needed it); ``u`` (the feed-forward input) and ``y`` (the block output). These are the
identities the maps rest on; ``models.checks`` compares them with the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxtyping import Float
from torch import Tensor

from tl_normmix.decompose.blocks import LayerTensors

__all__ = ["Recomposed", "recompose"]


@dataclass
class Recomposed:
    """Tensors of one layer rebuilt from the parts, ``[batch, pos, d_model]`` each."""

    norm_in: dict[str, Float[Tensor, "batch pos d_model"]] = field(default_factory=dict)
    norm_out: dict[str, Float[Tensor, "batch pos d_model"]] = field(default_factory=dict)
    mlp_in: Float[Tensor, "batch pos d_model"] | None = None
    resid_post: Float[Tensor, "batch pos d_model"] | None = None


def recompose(t: LayerTensors, *, through_ff: bool) -> Recomposed:
    """Rebuild the layer from ``resid_pre``, ``attn_out`` and the scales (and ``mlp_out`` when
    ``through_ff``; then also the feed-forward input and the block output). Stops where ``t``
    lacks a scale it would need."""
    layout = t.layout
    out = Recomposed()

    def chain(names: tuple[str, ...], z: Tensor | None, *, last: bool = False) -> Tensor | None:
        for index, name in enumerate(names):
            if z is None or f"{name}.scale" not in t:
                return None
            out.norm_in[name] = z
            if last and index == len(names) - 1:
                return None  # nothing reads this norm's output here: left to the caller
            z = t.norms[name].apply(z, t.scale(name))
            out.norm_out[name] = z
        return z

    r = t["resid_pre"]
    attention = chain(layout.attn_out, t["attn_out"])
    stream: Tensor | None = r
    if not layout.parallel:
        stream = chain(layout.mid, r + attention if attention is not None else None)
    if layout.has_mlp:
        out.mlp_in = chain(layout.mlp_in, stream, last=not through_ff)
    if not through_ff or stream is None or attention is None:
        return out
    y: Tensor | None = stream + attention if layout.parallel else stream
    if layout.has_mlp:
        written = chain(layout.mlp_out, t["mlp_out"])
        y = y + written if y is not None and written is not None else None
    out.resid_post = chain(layout.post, y)
    return out
