"""The block after its attention, as a function: pure tensor math (METHODS.md §4, value zeroing).

Value zeroing replaces the attention output of a layer and runs the *rest* of the block for real —
the norms recompute their scales, the feed-forward block runs on its new input:

    sequential:  h = mid(r + attn_out(A));  y = post(h + mlp_out(FF(mlp_in(h))))
    parallel:    y = post(r + attn_out(A) + mlp_out(FF(mlp_in(r))))

(``BlockLayout``'s chains; each norm ``γ ⊙ (z − mean z)/s(z) + β`` with the scale of its actual
input). Inputs may carry extra leading axes (``[batch, source, pos, d]``): one edited attention
output per source, all evaluated at once. In parallel blocks the feed-forward branch does not read
``A``; it is computed once (``parallel_branch``) and passed in.
"""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from tl_normmix.decompose.blocks import LayerTensors

__all__ = ["block_output", "parallel_branch"]


def _chain(t: LayerTensors, names: tuple[str, ...], z: Tensor) -> Tensor:
    for name in names:
        norm = t.norms[name]
        z = norm.apply(z, norm.scale_of(z))
    return z


def parallel_branch(
    t: LayerTensors, resid: Float[Tensor, "*batch pos d_model"]
) -> Float[Tensor, "*batch pos d_model"] | None:
    """``mlp_out(FF(mlp_in(r)))`` of a parallel block (None for other blocks, or without FF)."""
    if not t.layout.parallel or not t.layout.has_mlp:
        return None
    assert t.mlp is not None
    return _chain(t, t.layout.mlp_out, t.mlp.forward(_chain(t, t.layout.mlp_in, resid)))


def block_output(
    t: LayerTensors,
    resid: Float[Tensor, "*batch pos d_model"],
    attn: Float[Tensor, "*batch pos d_model"],
    branch: Float[Tensor, "*batch pos d_model"] | None = None,
) -> Float[Tensor, "*batch pos d_model"]:
    """The block output for block input ``resid`` and pure attention output ``attn`` (``b_O``
    included), everything after the attention recomputed; ``branch``: ``parallel_branch``."""
    layout = t.layout
    written = _chain(t, layout.attn_out, attn)
    if layout.parallel:
        stream = resid + written if branch is None else resid + written + branch
        return _chain(t, layout.post, stream)
    stream = _chain(t, layout.mid, resid + written)
    if layout.has_mlp:
        assert t.mlp is not None
        ff = t.mlp.forward(_chain(t, layout.mlp_in, stream))
        stream = stream + _chain(t, layout.mlp_out, ff)
    return _chain(t, layout.post, stream)
