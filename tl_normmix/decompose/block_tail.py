"""The block after its attention, as a function: pure tensor math (methods.md#the-peers-methods,
value zeroing).

Value zeroing replaces the attention output of a layer and runs the *rest* of the block for real —
the norms recompute their scales, the feed-forward block runs on its new input:

    sequential:  h = mid(r + attn_out(A));  y = post(h + mlp_out(FF(mlp_in(h))))
    parallel:    y = post(r + attn_out(A) + mlp_out(FF(mlp_in(r))))

(``BlockLayout``'s chains; each norm ``γ ⊙ (z − mean z)/s(z) + β`` with the scale of its actual
input). Inputs may carry extra leading axes (``[batch, source, pos, d]``): one edited attention
output per source, all evaluated at once. In parallel blocks the feed-forward branch does not read
``A``; it is computed once (``parallel_branch``) and passed in.

``RemovalTail`` evaluates the tail for every pair of a removal ``A_i − Σ_h α^h_ij f^h_j``
(value zeroing). In sequential blocks with a per-unit feed-forward block the pre-activations come
from ``PairForm``: the removal is carried through the norms before the FF as an affine form with
each pair's recomputed scale, so the first FF matmul costs ``N²·H·d_ff`` instead of
``N²·d·d_ff`` — the same numbers up to rounding.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from tl_normmix.decompose.blocks import LayerTensors, MLPSpec
from tl_normmix.decompose.pair_forms import PairForm

__all__ = ["RemovalTail", "block_output", "parallel_branch"]


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


class RemovalTail:
    """``block_output`` for attention outputs ``A_i − Σ_h α^h_ij f^h_j`` of one layer, for the
    (source ``j``, receiver ``i``) pairs of one chunk at a time (``outputs``).

    Sequential blocks with a per-unit feed-forward block take the folded path (module
    docstring); ``fold=False`` — and every other block — writes the removal out per pair and runs
    the block on it (the reference the folded path is tested against)."""

    def __init__(
        self,
        t: LayerTensors,
        resid: Float[Tensor, "batch pos d_model"],
        attn: Float[Tensor, "batch pos d_model"],
        sources: Float[Tensor, "batch pos head d_model"],
        branch: Float[Tensor, "batch pos d_model"] | None = None,
        *,
        fold: bool = True,
    ) -> None:
        self.t, self.resid, self.attn, self.sources, self.branch = t, resid, attn, sources, branch
        layout, mlp = t.layout, t.mlp
        self.folded = fold and not layout.parallel and layout.has_mlp and isinstance(mlp, MLPSpec)
        if not self.folded:
            return
        # the form before each norm up to the feed-forward input, and at that input
        self.states: list[PairForm] = []
        form = PairForm.removal(attn, sources)
        for name in layout.attn_out:
            self.states.append(form)
            form = form.normed(t.norms[name])
        form = form.plus(resid)
        for name in (*layout.mid, *layout.mlp_in):
            self.states.append(form)
            form = form.normed(t.norms[name])
        self.ff_input = form
        # the stream the feed-forward output joins (after `mid`): the form before this norm,
        # or — without norms in `mlp_in` — after the last norm of `mid`, if any
        self.stream_at = len(layout.attn_out) + len(layout.mid)
        self.stream_after_last = not layout.mlp_in and bool(layout.mid)

    def outputs(
        self,
        weights: Float[Tensor, "batch source receiver head"],
        receivers: slice,
        sources: slice,
    ) -> Float[Tensor, "batch source receiver d_model"]:
        """The block outputs of the pairs ``sources × receivers`` (``weights``: their
        ``α^h_ij``)."""
        t = self.t
        branch = self.branch[:, None, receivers] if self.branch is not None else None
        if not self.folded:
            delta = weights @ self.sources[:, sources]  # [batch, source, receiver, d]
            attn = self.attn[:, None, receivers] - delta
            return block_output(t, self.resid[:, None, receivers], attn, branch)
        mlp = t.mlp
        assert isinstance(mlp, MLPSpec)
        inverse: list[Tensor | None] = []  # 1/s of each norm, per pair (None: a fixed map)
        stream: Tensor | None = None
        for k, form in enumerate(self.states):
            norm = self.ff_input.norms[k]
            z = form.evaluate(weights, inverse, receivers, sources)
            scale = norm.scale_of(z)
            inverse.append(None if norm.kind == "fixed" else scale.reciprocal())
            if k == self.stream_at:
                stream = z
            elif k + 1 == len(self.states) and self.stream_after_last:
                stream = norm.apply(z, scale)
        if stream is None:  # no norm between the residual join and the feed-forward block
            stream = self.ff_input.evaluate(weights, inverse, receivers, sources)
        bias = None if mlp.bias_after_gate else mlp.b_in
        linear = self.ff_input.evaluate(weights, inverse, receivers, sources, mlp.W_in, bias)
        if mlp.W_gate is None:
            hidden = mlp.hidden(linear)
        else:
            gate = self.ff_input.evaluate(
                weights, inverse, receivers, sources, mlp.W_gate, mlp.b_gate
            )
            hidden = mlp.hidden(gate, linear)
        del linear
        ff = torch.addmm(mlp.b_out, hidden.flatten(0, -2), mlp.W_out).view(stream.shape)
        del hidden
        return _chain(t, t.layout.post, stream + _chain(t, t.layout.mlp_out, ff))
