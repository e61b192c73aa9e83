"""ALTI and its per-head form, the information-flow routes: pure tensor math
(methods.md#the-peers-methods).

The attention sublayer's resultant at receiver ``i`` is ``y_i = Σ_j T_i(x_j) + bias_i`` with

    T_i(x_j) = post_i( pre_i(Σ_h α^h_ij f^h(x_j)) + δ_ij x_i )

(``pre``: the attention output's own chain — sandwich and OLMo-2 post-attention norms, Granite's
multiplier; ``post``: the norms that read attention + residual before any branch does — LN1 of
post-LN blocks; none in pre-LN blocks, where ``y = resid_mid``; parallel blocks: ``y = r + A'``,
the stream the attention branch adds to). Every linearised norm has the receiver's frozen scale, so
off the diagonal ``T_i(x_j) = κ_i Σ_h α^h_ij g^h_j`` with ``g^h_j = T f^h_j`` fixed per source.

ALTI (Ferrando et al. 2022): ``c_ij = max(0, ‖y_i‖₁ − ‖y_i − T_i(x_j)‖₁)``, rows divided by their
sum. The L1 norm is no quadratic form: the pair vectors are built a block at a time (a few
receivers × the keys they attend to, 4 MiB: the CPU's cache holds it), never all ``N²·d``.

Routes (llm-transparency-tool): one part per (source ``j``, head ``h``), ``κ_i α^h_ij g^h_j``, and
the receiver's residual ``post_i(x_i)`` as one more part; ``c = max(‖y‖₁ − ‖y − part‖₁, floor)``
divided by the sum over all parts of the row (the tool uses ``floor = 1e-5``).

Value biases: ``f^h(x_j)`` holds ``b_V^h W_O^h`` (methods.md#attention-weights-and-norms). Given
``value_bias``, it is taken out of every source's vector and attributed to no part, ``Σ_h (Σ_j
α^h_ij) b_V^h W_O^h`` joining ``b_O`` — the convention of llm-transparency-tool, which loads models
with value biases folded into ``b_O``. The resultant ``y`` is the same either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_normmix.decompose import attention
from tl_normmix.decompose.residual import Request, through_bias

__all__ = ["AltiInputs", "alti_inputs", "alti_map", "alti_routes"]


@dataclass
class AltiInputs:
    """What ALTI needs of one layer: the masked pattern, the per-source vectors ``g^h_j = T f^h_j``
    (no receiver scale), the receivers' scale ``κ_i``, the diagonal parts ``T_i(x_i)``, the
    residual parts ``post_i(x_i)`` and the resultant ``y_i`` (bias terms included)."""

    pattern: Float[Tensor, "batch head_index query_pos key_pos"]
    g: Float[Tensor, "batch key_pos head_index d_model"]
    kappa: Float[Tensor, "batch query_pos"]
    diag: Float[Tensor, "batch pos d_model"]
    residual: Float[Tensor, "batch pos d_model"]
    whole: Float[Tensor, "batch pos d_model"]


def alti_inputs(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    v: Float[Tensor, "batch pos head_index d_head"],
    W_O: Float[Tensor, "head_index d_head d_model"],
    b_O: Float[Tensor, " d_model"],
    request: Request,
    value_bias: Float[Tensor, "head_index d_head"] | None = None,
) -> AltiInputs:
    """The per-layer tensors of ALTI for the parts ``post(pre(Σ_h α f) + δ x)`` of ``request``
    (``request.residual`` is ``x``, the block input); ``value_bias`` (``b_V`` per query head):
    attribute ``b_V W_O`` to no part (see the module docstring)."""
    assert request.residual is not None
    x = request.residual
    pre, post = request.pre, request.post
    bias = b_O.expand_as(x)
    if value_bias is not None:
        v = v - value_bias
        written = torch.einsum("hd,hdm->hm", value_bias, W_O)  # b_V^h W_O^h
        bias = bias + torch.einsum("bhi,hm->bim", pattern.sum(-1), written)
    f = attention.source_vectors(v, W_O)  # [batch, key, head, d]
    transform = request.transform()
    g = f if transform is None else transform(f)
    own = attention.self_part(pattern.diagonal(dim1=-2, dim2=-1), f)
    mixed = attention.mixed_output(pattern, v, W_O)
    diag = post(pre(own) + x)
    bias = through_bias(post, through_bias(pre, bias))
    whole = post(pre(mixed - own)) + diag + bias
    kappa = pre.kappa(x) * post.kappa(x)
    return AltiInputs(pattern, g, kappa, diag, post(x), whole)


def _chunk(batch: int, pos: int, width: int, block_floats: int | None) -> int:
    if block_floats is None:
        return pos
    return max(1, min(pos, block_floats // max(1, batch * pos * width)))


def _attended_ends(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"], eps: float
) -> list[int]:
    """``attention.attended_ends``, or ``N`` for every receiver with ``eps`` (no part is exactly
    zero then)."""
    n = pattern.shape[-1]
    return [n] * n if eps else attention.attended_ends(pattern)


def alti_map(
    a: AltiInputs,
    mask: Bool[Tensor, "batch pos"],
    eps: float = 0.0,
    *,
    block_floats: int | None = None,
) -> tuple[Float[Tensor, "batch query_pos key_pos"], Float[Tensor, "batch query_pos"]]:
    """ALTI's per-layer map (rows sum to 1 over real tokens) and ``1 − c_ii``, the share a
    receiver takes from the other tokens. ``eps``: the distance is ``‖T − y + eps‖₁``, as
    ``torch.nn.functional.pairwise_distance`` computes it in the reference code (``1e-6``).
    ``block_floats``: floats of the pair vectors built at a time (blocks the CPU's cache holds
    are several times faster than large ones); None: all at once."""
    batch, _, n, _ = a.pattern.shape
    d = a.g.shape[-1]
    out = a.pattern.new_zeros(batch, n, n)
    whole_l1 = a.whole.abs().sum(-1)  # [batch, query]
    # Off the diagonal T_i(x_j) = κ_i P_ij (P_ij = Σ_h α^h_ij g^h_j) and κ_i > 0, so
    # ‖T_ij − y_i + eps‖₁ = κ_i ‖P_ij − w_i‖₁ with w_i = (y_i − eps) / κ_i: the pair work is one
    # matmul, one in-place subtraction, one in-place abs and one sum.
    kappa = a.kappa.clamp_min(torch.finfo(a.kappa.dtype).tiny)
    w = (a.whole - eps) / kappa[..., None]
    chunk = _chunk(batch, n, d, block_floats)
    ends = _attended_ends(a.pattern, eps)
    buffer = a.g.new_empty(batch * n * chunk * d)  # one for every chunk (see alti_routes)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        hi = max(ends[start:stop])  # later keys: zero parts, c = 0 (out stays 0)
        if hi == 0:
            continue
        by_key = a.pattern[:, :, start:stop, :hi].transpose(-1, -2).contiguous()
        shape = (batch, hi, stop - start, d)
        parts = buffer[: math.prod(shape)].view(shape)
        torch.matmul(by_key.permute(0, 2, 3, 1), a.g[:, :hi], out=parts)  # P_ij [b, key, q, d]
        parts.sub_(w[:, None, start:stop]).abs_()
        distance = parts.sum(-1) * kappa[:, None, start:stop]  # [batch, key, q]
        out[:, start:stop, :hi] = (
            (whole_l1[:, None, start:stop] - distance).clamp_min(0.0).transpose(1, 2)
        )
    # the diagonal parts T_i(x_i) carry the residual: their own distances
    own = (a.whole - a.diag - eps).abs().sum(-1)
    out.diagonal(dim1=-2, dim2=-1).copy_((whole_l1 - own).clamp_min(0.0))
    out.masked_fill_(~(mask[:, :, None] & mask[:, None, :]), 0.0)
    out = out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
    ratio = 1.0 - out.diagonal(dim1=-2, dim2=-1)
    return out, ratio


def alti_routes(
    a: AltiInputs,
    mask: Bool[Tensor, "batch pos"],
    floor: float = 0.0,
    eps: float = 0.0,
    *,
    block_floats: int | None = None,
) -> tuple[Float[Tensor, "batch head_index query_pos key_pos"], Float[Tensor, "batch query_pos"]]:
    """Per-(head, source) contributions and the residual's, normalised together per receiver
    (llm-transparency-tool's attention contributions; ``floor`` as its ``EPS``, ``eps`` as its
    ``pairwise_distance``). Padded keys are no parts (zero); padded receivers are zero rows with
    a NaN residual share. With ``eps`` every part is built (none is exactly zero)."""
    batch, heads, n, _ = a.pattern.shape
    d = a.g.shape[-1]
    whole_l1 = a.whole.abs().sum(-1)
    residual = (whole_l1 - (a.whole - a.residual - eps).abs().sum(-1)).clamp_min(floor)
    keys = mask[:, None, None, :].to(a.pattern.device)
    kappa = a.kappa.clamp_min(torch.finfo(a.kappa.dtype).tiny)
    # ‖κ_i αg − y_i + eps‖₁ = κ_i ‖αg − w_i‖₁ with w_i = (y_i − eps)/κ_i (see alti_map)
    negative_w = (eps - a.whole) / kappa[..., None]
    # distance[b, i, j, h] = ‖α^h_ij g^h_j − w_i‖₁, built in blocks of (receivers, keys) small
    # enough for the CPU's cache (the passes over a block then run from cache, not memory: 4x at
    # N = 256 on SmolLM2), in one buffer (a fresh tensor per block costs more than its arithmetic)
    distance = a.pattern.new_zeros(batch, n, n, heads)
    per_pair = max(1, batch * heads * d)
    block_floats = block_floats or per_pair * n * n
    keys_per_block = max(1, min(n, block_floats // per_pair))
    receivers_per_block = max(1, min(n, block_floats // (per_pair * keys_per_block)))
    buffer = a.g.new_empty(receivers_per_block * keys_per_block * per_pair)
    # keys no receiver attends to (the future, in causal models) are zero parts, not built:
    # ‖y‖₁ − ‖y − 0‖₁ = 0, the floor (with eps every part is built)
    ends = _attended_ends(a.pattern, eps)
    for start in range(0, n, receivers_per_block):
        stop = min(start + receivers_per_block, n)
        hi = max(ends[start:stop])
        for first in range(0, hi, keys_per_block):
            last = min(first + keys_per_block, hi)
            alpha = a.pattern[:, :, start:stop, first:last].permute(0, 2, 3, 1)
            shape = (batch, stop - start, last - first, heads, d)
            parts = buffer[: math.prod(shape)].view(shape)
            torch.addcmul(
                negative_w[:, start:stop, None, None],
                alpha[..., None],
                a.g[:, None, first:last],
                out=parts,
            ).abs_()
            torch.sum(parts, dim=-1, out=distance[:, start:stop, first:last])
    c = (whole_l1[:, :, None, None] - distance * kappa[:, :, None, None]).clamp_min(floor)
    out = c.permute(0, 3, 1, 2)  # [batch, head, q, key]
    if not eps:  # an exactly zero part (the future included) gets exactly the floor
        out = out.masked_fill(a.pattern == 0, floor)
    out = out.masked_fill(~keys, 0.0)
    total = out.sum(dim=(1, 3)) + residual  # [batch, query]
    total = total.clamp_min(torch.finfo(out.dtype).tiny)
    out = out / total[:, None, :, None]
    share = residual / total
    out.masked_fill_(~mask[:, None, :, None], 0.0)
    return out, share.masked_fill(~mask, float("nan"))
