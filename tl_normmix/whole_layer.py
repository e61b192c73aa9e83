"""Whole-layer scopes of one layer: through the feed-forward block (METHODS.md §3).

Every vector a source ``j`` contributes at receiver ``i`` is kept in *factored* form: for
``j ≠ i`` it is ``K_i · Σ_h α^h_ij T f^h_j`` (``T`` a fixed linear map made of the linearised
norms, ``K_i`` a per-receiver scalar); the ``N`` diagonal vectors are explicit. So:

* the feed-forward input parts ``u_ij`` (the ``attnresln`` decomposition of the norm that feeds
  the FF: LN1 in post-LN blocks, LN2 in pre-LN and sandwich blocks) enter the FF as
  ``u_ij W_in = K_i Σ_h α^h_ij (T f^h_j W_in)`` — the bracket is precomputed per source and
  head (``N·H·d·d_ff``), leaving ``N²·H·d_ff`` for the pairs;
* ``IG_ij = ((u_ij W_in) ⊙ c_i) W_out`` (gated: two branches) is one large matmul over the
  pairs of a chunk of queries (``N²·d_ff·d``);
* the residual parts added after the FF (``+RES2``) are the ``attnres`` parts (pre-LN,
  sandwich) or the FF input parts themselves (post-LN), and the norm after them (``+LN2``,
  post-LN) is applied to each pair vector with the receiver's scale.

Chunks of queries bound the working memory to ``O(chunk · N · (d_ff + d))``; nothing of size
``N²·d_ff`` exists. Sums over sources of the pair vectors give the mixing ratios and the
completeness residuals (parts + bias terms against the cached block output).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_normmix import attention, feedforward, residual
from tl_normmix.activations import ACTIVATIONS, NON_ELEMENTWISE
from tl_normmix.adapter import LayerTensors
from tl_normmix.attention_block import norm_chain
from tl_normmix.blocks import BlockKind, NormSpec
from tl_normmix.residual import NormChain, Request
from tl_normmix.scopes import FF_SCOPES, NORM_CHAINS

__all__ = ["FFOptions", "WholeLayerMaps", "chunk_bytes", "whole_layer_maps"]

#: Working memory the default query chunk aims at.
DEFAULT_BUDGET_BYTES = 256 * 2**20


@dataclass(frozen=True)
class FFOptions:
    """How the feed-forward block is split (METHODS §3).

    ``quadrature_points``: None — the closed form for element-wise activations and
    ``feedforward.DEFAULT_QUADRATURE_POINTS`` Gauss–Legendre points for gated blocks; an integer —
    quadrature with that many points for every block (the only way to use an activation the
    closed form does not know). ``chunk_size``: queries per chunk (None: fit
    ``DEFAULT_BUDGET_BYTES``).
    """

    quadrature_points: int | None = None
    chunk_size: int | None = None


@dataclass
class WholeLayerMaps:
    maps: dict[str, Float[Tensor, "batch query_pos key_pos"]]
    ratios: dict[str, Float[Tensor, "batch query_pos"]]
    completeness: dict[str, Float[Tensor, "batch pos"]]  # relative residual per token


@dataclass
class _Stage:
    """The parts of one stage in factored form: ``K_i Σ_h α^h_ij (T f^h_j)`` off the diagonal,
    ``diag_i`` on it, ``bias_i`` for the bias terms."""

    chain: Request
    kappa: Tensor  # [batch, pos]
    diag: Tensor  # [batch, pos, d]
    bias: Tensor  # [batch, pos, d]
    total: Tensor  # Σ_j parts [batch, pos, d]


def chunk_bytes(batch: int, pos: int, chunk: int, d_model: int, d_mlp: int, gated: bool) -> int:
    """Working memory of one query chunk of the whole-layer pass (float32), in bytes."""
    hidden = (2 if gated else 1) * d_mlp
    return 4 * batch * pos * chunk * (hidden + 3 * d_model)


def fixed_bytes(batch: int, pos: int, heads: int, d_model: int, d_mlp: int, gated: bool) -> int:
    """Memory held for the whole pass: ``T f^h_j W_in`` (and ``W_gate``) and ``T f^h_j``."""
    hidden = (2 if gated else 1) * d_mlp
    return 4 * batch * pos * heads * (hidden + 2 * d_model)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: ``mem_get_info``; CPU: ``MemAvailable``), if known."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def whole_layer_maps(
    t: LayerTensors,
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    mask: Bool[Tensor, "batch pos"],
    scopes: list[str],
    options: FFOptions = FFOptions(),
) -> WholeLayerMaps:
    """Maps, ratios and completeness residuals of the whole-layer ``scopes`` for one layer
    (``pattern`` already masked). Padded cells are zero, padded tokens NaN."""
    kind = t.spec.kind
    if kind is BlockKind.PARALLEL:
        return _parallel(t, pattern, mask, scopes)
    names = [s for s in scopes if s in FF_SCOPES or s == "layer_n"]
    act, points = _integration(t, options)
    mlp = t.mlp
    assert mlp is not None
    batch, pos, heads = t.v.shape[0], t.v.shape[1], t.v.shape[2]
    d, d_mlp = t.W_O.shape[-1], mlp.W_in.shape[1]
    chunk = _chunk_size(options.chunk_size, t, batch, pos, heads, d, d_mlp, mlp.gated)

    f = attention.source_vectors(t.v, t.W_O)  # [batch, key, head, d]
    own = attention.self_part(pattern.diagonal(dim1=-2, dim2=-1), f)
    context = t["attn_out"] - t.b_O - own
    x = t["resid_pre"]
    b_O = t.b_O.expand_as(x)

    ff_in = _stage(t, "attnresln_n", own, context, x, b_O)  # the FF input u_ij
    res = ff_in if kind is BlockKind.POST_LN else _stage(t, "attnres_n", own, context, x, b_O)
    coefficients = feedforward.ig_coefficients(
        mlp, act, ff_in.total, ff_in.bias, quadrature_points=points
    )
    out_norm = norm_chain(t, ("ln2_post",)) if kind is BlockKind.SANDWICH else NormChain()
    W_written = out_norm(mlp.W_out, per_receiver=False)  # T'' applied to each row of W_out
    out_kappa = out_norm.kappa(x)
    final = norm_chain(t, ("ln2",)) if kind is BlockKind.POST_LN else None
    final_kappa = final.kappa(x) if final is not None else None

    # Per source and head: T f^h_j W_in (and W_gate); the residual stage's T f^h_j.
    g_in = _transform(ff_in.chain, f)
    weights = [mlp.W_in] + ([mlp.W_gate] if mlp.W_gate is not None else [])
    # One 2-D matmul: ``g_in`` may be a strided view, on which ``@`` would broadcast W_in into a
    # batched matmul that runs several times slower.
    flat = g_in.reshape(-1, d)
    first = torch.cat([flat @ w for w in weights], dim=-1).view(*g_in.shape[:-1], -1)
    first_diag = torch.cat([ff_in.diag @ w for w in weights], dim=-1)  # j = i, explicit
    g_res = g_in if res is ff_in else _transform(res.chain, f)
    del f, g_in

    need_ff = "attnreslnff_n" in names
    need_res = "attnreslnffres_n" in names or ("layer_n" in names and final is None)
    need_final = final is not None and bool({"attnreslnffresln_n", "layer_n"} & set(names))
    stages = [s for s, w in (("ff", need_ff), ("res", need_res), ("final", need_final)) if w]
    norms = {s: pattern.new_zeros(batch, pos, pos) for s in stages}
    sums = {s: pattern.new_zeros(batch, pos, d) for s in stages}
    diags = {s: pattern.new_zeros(batch, pos, d) for s in stages}

    for start in range(0, pos, chunk):
        stop = min(start + chunk, pos)
        rows = torch.arange(start, stop, device=pattern.device)  # receivers i of the chunk
        cols = rows - start  # their index within the chunk
        by_key = pattern[:, :, start:stop].transpose(-1, -2).contiguous().permute(0, 2, 3, 1)
        # u_ij W_in (, u_ij W_gate) up to the receiver's scale K_i: [batch, key, chunk, ·]
        hidden = torch.matmul(by_key, first)
        k = coefficients.rows(start, stop)
        # Off the diagonal K_i and the IG coefficients act together: one multiply.
        hidden = feedforward.ig_hidden(
            hidden[..., :d_mlp],
            hidden[..., d_mlp:] if mlp.gated else None,
            k.scaled(ff_in.kappa[:, None, start:stop, None]),
            inplace=True,
        )
        diag_in = first_diag[:, start:stop]
        hidden[:, rows, cols] = feedforward.ig_hidden(
            diag_in[..., :d_mlp],
            diag_in[..., d_mlp:] if mlp.gated else None,
            coefficients.rows(start, stop, pairs=False),
        )
        vectors = None
        if need_ff or not out_norm.norms:
            vectors = torch.matmul(hidden, mlp.W_out)  # IG_ij: [batch, key, chunk, d]
            if need_ff:
                _collect(vectors, norms["ff"], sums["ff"], diags["ff"], start, stop, rows, cols)
        if not (need_res or need_final):
            continue
        if out_norm.norms:  # sandwich: the post-FF norm, linearised at the receiver
            vectors = torch.matmul(hidden, W_written) * out_kappa[:, None, start:stop, None]
        del hidden
        assert vectors is not None
        residual = torch.matmul(by_key, g_res) * res.kappa[:, None, start:stop, None]
        residual[:, rows, cols] = res.diag[:, start:stop]
        vectors += residual
        del residual
        if need_res:
            _collect(vectors, norms["res"], sums["res"], diags["res"], start, stop, rows, cols)
        if need_final:
            assert final is not None and final_kappa is not None
            vectors = final(vectors, per_receiver=False) * final_kappa[:, None, start:stop, None]
            _collect(
                vectors, norms["final"], sums["final"], diags["final"], start, stop, rows, cols
            )

    targets, biases = _targets(t, mlp.forward(ff_in.bias), res.bias, out_norm, final)
    stage_of = {
        "attnreslnff_n": "ff",
        "attnreslnffres_n": "res",
        "attnreslnffresln_n": "final",
        "layer_n": "final" if final is not None else "res",
    }
    result = WholeLayerMaps({}, {}, {})
    for name in names:
        stage = stage_of[name]
        result.maps[name] = norms[stage]  # layer_n shares its stage's tensor (copied by maps.py)
        result.ratios[name] = _ratio(sums[stage], diags[stage])
        result.completeness[name] = _residual(sums[stage] + biases[stage], targets[stage])
    return result


def _collect(
    vectors: Tensor,
    norms: Tensor,
    sums: Tensor,
    diags: Tensor,
    start: int,
    stop: int,
    rows: Tensor,
    cols: Tensor,
) -> None:
    """Store ``‖v_ij‖``, ``Σ_j v_ij`` and ``v_ii`` of a chunk of pair vectors ``[b, key, q, d]``."""
    norms[:, start:stop] = vectors.norm(dim=-1).transpose(1, 2)
    sums[:, start:stop] = vectors.sum(dim=1)
    diags[:, start:stop] = vectors[:, rows, cols]


def _ratio(total: Tensor, diag: Tensor) -> Tensor:
    context = (total - diag).norm(dim=-1)
    own = diag.norm(dim=-1)
    return context / (context + own).clamp_min(torch.finfo(total.dtype).tiny)


def _residual(rebuilt: Tensor, target: Tensor) -> Tensor:
    """``‖rebuilt − target‖ / ‖target‖`` per token."""
    scale = target.norm(dim=-1).clamp_min(torch.finfo(target.dtype).tiny)
    return (rebuilt - target).norm(dim=-1) / scale


def _transform(request: Request, f: Tensor) -> Tensor:
    transform = request.transform()
    return f if transform is None else transform(f)


def _through_bias(chain: NormChain, b: Tensor) -> Tensor:
    for norm, scale in chain.norms:
        b = norm.apply(b, scale)
    return b


def _stage(
    t: LayerTensors, scope: str, own: Tensor, context: Tensor, x: Tensor, b_O: Tensor
) -> _Stage:
    """The ``scope`` decomposition (``attnres_n`` or ``attnresln_n``) in factored form."""
    pre_names, post_names = NORM_CHAINS[(scope, t.spec.kind)]
    pre, post = norm_chain(t, pre_names), norm_chain(t, post_names)
    diag = post(pre(own) + x)
    total = post(pre(context)) + diag
    bias = _through_bias(post, _through_bias(pre, b_O))
    kappa = pre.kappa(x) * post.kappa(x)
    return _Stage(chain=Request(x, pre, post), kappa=kappa, diag=diag, bias=bias, total=total)


def _targets(
    t: LayerTensors, ff_bias: Tensor, res_bias: Tensor, out_norm: NormChain, final: NormChain | None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per stage: the cached tensor the parts must rebuild, and the bias terms to add."""
    targets = {"ff": t["mlp_out"]}
    biases = {"ff": ff_bias}
    ff_written = _through_bias(out_norm, ff_bias)
    if final is not None:  # post-LN: RES2 is the input of LN2, the block output is after it
        targets["res"] = t["ln2.in"]
        biases["res"] = ff_written + res_bias
        targets["final"] = t["resid_post"]
        biases["final"] = _through_bias(final, biases["res"])
    else:
        targets["res"] = t["resid_post"]
        biases["res"] = ff_written + res_bias
    return targets, biases


def _integration(
    t: LayerTensors, options: FFOptions
) -> tuple[Callable[[Tensor], Tensor], int | None]:
    """The activation and the number of quadrature points (None: closed form)."""
    mlp = t.mlp
    assert mlp is not None
    name = mlp.act_fn
    if name in NON_ELEMENTWISE:
        raise NotImplementedError(
            f"Layer {t.layer}: activation {name!r} is not element-wise, so integrated gradients "
            "through the feed-forward block have no per-unit form here; whole-layer scopes are "
            "not supported for this model."
        )
    points = options.quadrature_points
    if points is None and mlp.gated:
        points = feedforward.DEFAULT_QUADRATURE_POINTS
    act = ACTIVATIONS.get(name)
    if act is None:
        if points is None or mlp.act is None:
            raise NotImplementedError(
                f"Layer {t.layer}: activation {name!r} has no closed form in tl_normmix (known: "
                f"{', '.join(ACTIVATIONS)}). Pass quadrature_points=32 to mixing_maps to integrate "
                "the model's own activation numerically (Gauss–Legendre)."
            )
        act = mlp.act
    return act, points


def _chunk_size(
    chunk: int | None,
    t: LayerTensors,
    batch: int,
    pos: int,
    heads: int,
    d: int,
    d_mlp: int,
    gated: bool,
) -> int:
    per_query = chunk_bytes(batch, pos, 1, d, d_mlp, gated)
    if chunk is None:
        return max(1, min(pos, DEFAULT_BUDGET_BYTES // per_query))
    if chunk < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk}.")
    free = available_bytes(t.device)
    fixed = fixed_bytes(batch, pos, heads, d, d_mlp, gated)
    need = fixed + per_query * min(chunk, pos)
    if free is not None and need > free:
        fits = (free - fixed) // per_query
        advice = (
            f"chunk_size={fits} would fit"
            if fits >= 1
            else "no chunk size fits: use a shorter input, a smaller batch or fewer layers"
        )
        raise MemoryError(
            f"Layer {t.layer}: chunk_size={chunk} needs about {need / 2**30:.1f} GiB for the "
            f"feed-forward pass (batch {batch}, {pos} tokens, d_mlp {d_mlp}) but "
            f"{free / 2**30:.1f} GiB are free; {advice}."
        )
    return chunk


def _parallel(t: LayerTensors, pattern: Tensor, mask: Tensor, scopes: list[str]) -> WholeLayerMaps:
    """Parallel blocks: the FF reads ``LN2(x_i)`` of the layer input, so within the layer its
    whole output belongs to ``j = i``: ``IG_ii = FF(u_i) − FF(β)``, bias ``FF(β)``."""
    assert not set(scopes) & set(FF_SCOPES), "refused by scopes.scope_roles"
    mlp = t.mlp
    assert mlp is not None
    ln2: NormSpec = t.norms["ln2"]
    beta = ln2.bias if ln2.bias is not None else torch.zeros_like(t.b_O)
    ff_bias = mlp.forward(beta.expand_as(t["resid_pre"]))
    request = Request(t["resid_pre"] + t["mlp_out"] - ff_bias)
    result = residual.decompose(
        pattern, t.v, t.W_O, {"layer_n": request}, mixed=t["attn_out"] - t.b_O
    )
    layer_map, ratio = result.maps["layer_n"]
    # Σ_j parts + b_O + FF(β), with the attention part rebuilt from the pattern and values.
    mixed = attention.mixed_output(pattern, t.v, t.W_O)
    rebuilt = mixed + t.b_O + t["resid_pre"] + t["mlp_out"]
    return WholeLayerMaps(
        maps={"layer_n": layer_map},
        ratios={"layer_n": ratio},
        completeness={"layer_n": _residual(rebuilt, t["resid_post"])},
    )
