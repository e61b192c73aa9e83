"""Whole-layer maps of one layer: through the feed-forward block (METHODS.md §3).

Every vector a source ``j`` contributes at receiver ``i`` is kept in *factored* form: for
``j ≠ i`` it is ``K_i · Σ_h α^h_ij T f^h_j`` (``T`` a fixed linear map made of the linearised
norms, ``K_i`` a per-receiver scalar); the ``N`` diagonal vectors are explicit. So:

* the feed-forward input parts ``u_ij`` (the residual stream after the attention branch, through
  the norms that feed the FF — ``BlockLayout.ff_input``) enter the FF as
  ``u_ij W_in = K_i Σ_h α^h_ij (T f^h_j W_in)`` — the bracket is precomputed per source and
  head (``N·H·d·d_ff``), leaving ``N²·H·d_ff`` for the pairs;
* ``IG_ij = ((u_ij W_in) ⊙ c_i) W_out`` (gated: two branches) is one large matmul over the
  pairs of a chunk of queries (``N²·d_ff·d``); a feed-forward block without a closed form (mixture
  of experts) is integrated by quadrature of forward-mode derivatives (``generic_ff``);
* the FF output passes through the block's ``mlp_out`` chain (post-FF norm, multiplier), the
  stream after the attention branch is added (``+RES2``), and the block's ``post`` norms (post-LN)
  are applied to each pair vector with the receiver's scale.

Chunks of queries bound the working memory to ``O(chunk · N · (d_ff + d))``; nothing of size
``N²·d_ff`` exists. Sums over sources of the pair vectors give the mixing ratios and the
completeness residuals (parts + bias terms against the cached tensors). Parallel blocks and blocks
without a feed-forward part have only the block output, computed by ``residual.decompose``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_normmix.decompose import attention, feedforward, generic_ff, residual
from tl_normmix.decompose.activations import is_elementwise
from tl_normmix.decompose.attention_block import norm_chain
from tl_normmix.decompose.blocks import FFModule, LayerTensors, MLPSpec, Stage
from tl_normmix.decompose.residual import NormChain, Request, through_bias

__all__ = [
    "WHOLE_LAYER_STAGES",
    "FFOptions",
    "WholeLayerMaps",
    "available_bytes",
    "chunk_bytes",
    "hidden_width",
    "points_for",
    "whole_layer_maps",
]

#: Working memory the default query chunk aims at.
DEFAULT_BUDGET_BYTES = 256 * 2**20

#: Receivers per chunk even where that exceeds the budget (long inputs): with one receiver the
#: first matmul runs as a matrix-vector product per key (SmolLM2, 2,048 tokens, one layer: 44 s
#: with chunks of 1, 26 s with 2, 24 s with 4, 27 s with 8).
MIN_CHUNK = 4

#: The stages computed here.
WHOLE_LAYER_STAGES = frozenset({Stage.FF, Stage.FF_RES, Stage.OUT})


@dataclass(frozen=True)
class FFOptions:
    """How the feed-forward block is split (METHODS §3).

    ``quadrature_points``: None — the closed form for element-wise activations,
    ``feedforward.DEFAULT_QUADRATURE_POINTS`` Gauss–Legendre points for gated blocks and for the
    generic path; an integer — quadrature with that many points for every block.
    ``chunk_size``: queries per chunk (None: fit ``DEFAULT_BUDGET_BYTES``).
    """

    quadrature_points: int | None = None
    chunk_size: int | None = None


@dataclass
class WholeLayerMaps:
    maps: dict[str, Float[Tensor, "batch query_pos key_pos"]]
    ratios: dict[str, Float[Tensor, "batch query_pos"]]
    completeness: dict[str, Float[Tensor, "batch pos"]]  # relative residual per token


@dataclass
class _Parts:
    """The parts of one stream in factored form: ``K_i Σ_h α^h_ij (T f^h_j)`` off the diagonal,
    ``diag_i`` on it, ``bias_i`` for the bias terms."""

    chain: Request
    kappa: Tensor  # [batch, pos]
    diag: Tensor  # [batch, pos, d]
    bias: Tensor  # [batch, pos, d]
    total: Tensor  # Σ_j parts [batch, pos, d]


def chunk_bytes(batch: int, pos: int, chunk: int, d_model: int, hidden: int) -> int:
    """Working memory of one query chunk of the whole-layer pass (float32), in bytes;
    ``hidden``: hidden units per pair vector (``d_mlp``, twice that for gated blocks)."""
    return 4 * batch * pos * chunk * (hidden + 3 * d_model)


def fixed_bytes(batch: int, pos: int, heads: int, d_model: int, hidden: int) -> int:
    """Memory held for the whole pass: ``T f^h_j W_in`` (and ``W_gate``) and ``T f^h_j``."""
    return 4 * batch * pos * heads * (hidden + 2 * d_model)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: ``mem_get_info`` plus the blocks PyTorch's caching
    allocator holds unused; CPU: ``MemAvailable``), if known."""
    if device.type == "cuda":  # free on the device + what PyTorch's cache holds unused
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + cached
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
    stages: Mapping[str, Stage],
    options: FFOptions = FFOptions(),
    ff_sink: Callable[[int, int, Tensor], None] | None = None,
) -> WholeLayerMaps:
    """Maps, ratios and completeness residuals named by ``stages`` (``FF``, ``FF_RES``, ``OUT``)
    for one layer (``pattern`` already masked). Padded cells are zero, padded tokens NaN.
    ``ff_sink(start, stop, ig)`` receives each chunk's ``IG_ij`` vectors ``[batch, key, chunk,
    d]`` (receivers ``start:stop``) for analyses that need the vectors, not only their norms; the
    keys are the first ones up to the last any receiver of the chunk attends to (the later keys'
    vectors are zero)."""
    layout = t.layout
    if layout.parallel or not layout.has_mlp:
        assert set(stages.values()) <= {Stage.OUT}, "refused by scopes"
        return _single_stream(t, pattern, list(stages))
    mlp = t.mlp
    assert mlp is not None
    points = points_for(t, mlp, options)
    batch, pos, heads = t.v.shape[0], t.v.shape[1], t.v.shape[2]
    d = t.W_O.shape[-1]
    width = hidden_width(mlp)
    chunk = _chunk_size(options.chunk_size, t, batch, pos, heads, d, width)

    f = attention.source_vectors(t.v, t.W_O)  # [batch, key, head, d]
    own = attention.self_part(pattern.diagonal(dim1=-2, dim2=-1), f)
    context = t["attn_out"] - t.b_O - own
    x = t["resid_pre"]
    b_O = t.b_O.expand_as(x)

    ff_in = _parts(t, layout.attn_out, layout.ff_input, own, context, x, b_O)  # u_ij
    res = (
        ff_in if not layout.mlp_in else _parts(t, layout.attn_out, layout.mid, own, context, x, b_O)
    )
    out_norm = norm_chain(t, layout.mlp_out)
    out_kappa = out_norm.kappa(x)
    final = norm_chain(t, layout.post) if layout.post else None
    final_kappa = final.kappa(x) if final is not None else None

    g_in = _transform(ff_in.chain, f)  # T f^h_j, per source and head
    g_res = g_in if res is ff_in else _transform(res.chain, f)
    closed = _ClosedForm(mlp, ff_in, g_in, points, out_norm) if isinstance(mlp, MLPSpec) else None
    del f

    wanted = set(stages.values())
    need_ff = Stage.FF in wanted or ff_sink is not None
    need_res = Stage.FF_RES in wanted or (Stage.OUT in wanted and final is None)
    need_final = final is not None and Stage.OUT in wanted
    kept = [
        s for s, w in (("ff", Stage.FF in wanted), ("res", need_res), ("final", need_final)) if w
    ]
    norms = {s: pattern.new_zeros(batch, pos, pos) for s in kept}
    sums = {s: pattern.new_zeros(batch, pos, d) for s in kept}
    diags = {s: pattern.new_zeros(batch, pos, d) for s in kept}

    ends = attention.attended_ends(pattern)
    for start in range(0, pos, chunk):
        stop = min(start + chunk, pos)
        # keys from `hi` on are attended by no receiver of the chunk: their pair vectors are zero
        hi = max(stop, *ends[start:stop])
        rows = torch.arange(start, stop, device=pattern.device)  # receivers i of the chunk
        cols = rows - start  # their index within the chunk
        by_key = pattern[:, :, start:stop, :hi].transpose(-1, -2).contiguous().permute(0, 2, 3, 1)
        need_written = need_res or need_final
        if closed is not None:
            ig, written = closed.chunk(by_key, start, stop, rows, cols, need_ff, need_written)
        else:
            assert isinstance(mlp, FFModule) and points is not None
            u = torch.matmul(by_key, g_in[:, :hi]) * ff_in.kappa[:, None, start:stop, None]
            u[:, rows, cols] = ff_in.diag[:, start:stop]
            ig = generic_ff.integrated_gradients(
                mlp, u, ff_in.total[:, start:stop], ff_in.bias[:, start:stop], points
            )
            del u
            written = out_norm(ig, per_receiver=False) if out_norm.norms else ig
        if need_ff:
            assert ig is not None
            if ff_sink is not None:
                ff_sink(start, stop, ig)
            if "ff" in norms:
                _collect(ig, norms["ff"], sums["ff"], diags["ff"], start, stop, rows, cols)
        del ig
        if not need_written:
            continue
        assert written is not None
        if out_norm.norms:  # the FF output's own chain, linearised at the receiver
            written = written * out_kappa[:, None, start:stop, None]
        residual_parts = torch.matmul(by_key, g_res[:, :hi]) * res.kappa[:, None, start:stop, None]
        residual_parts[:, rows, cols] = res.diag[:, start:stop]
        vectors = written + residual_parts
        del residual_parts, written
        if need_res:
            _collect(vectors, norms["res"], sums["res"], diags["res"], start, stop, rows, cols)
        if need_final:
            assert final is not None and final_kappa is not None
            vectors = final(vectors, per_receiver=False) * final_kappa[:, None, start:stop, None]
            _collect(
                vectors, norms["final"], sums["final"], diags["final"], start, stop, rows, cols
            )

    ff_bias = _forward(mlp, ff_in.bias)
    targets, biases = _targets(t, ff_bias, res.bias, out_norm, final)
    stage_of = {
        Stage.FF: "ff",
        Stage.FF_RES: "res",
        Stage.OUT: "final" if final is not None else "res",
    }
    result = WholeLayerMaps({}, {}, {})
    for name, stage in stages.items():
        kept_stage = stage_of[stage]
        result.maps[name] = norms[kept_stage]  # stages may share a tensor (copied by MapsBuilder)
        result.ratios[name] = _ratio(sums[kept_stage], diags[kept_stage])
        result.completeness[name] = _residual(
            sums[kept_stage] + biases[kept_stage], targets[kept_stage]
        )
    return result


class _ClosedForm:
    """The closed-form IG of an ``MLPSpec`` over a chunk of pairs (METHODS §3)."""

    def __init__(
        self, mlp: MLPSpec, ff_in: _Parts, g_in: Tensor, points: int | None, out_norm: NormChain
    ) -> None:
        self.mlp, self.ff_in = mlp, ff_in
        self.d_mlp = mlp.W_in.shape[1]
        self.coefficients = feedforward.ig_coefficients(
            mlp, ff_in.total, ff_in.bias, quadrature_points=points
        )
        weights = [mlp.W_in] + ([mlp.W_gate] if mlp.W_gate is not None else [])
        # One 2-D matmul: ``g_in`` may be a strided view, on which ``@`` would broadcast W_in into
        # a batched matmul that runs several times slower.
        d = g_in.shape[-1]
        self.first = torch.cat([g_in.reshape(-1, d) @ w for w in weights], dim=-1).view(
            *g_in.shape[:-1], -1
        )
        self.first_diag = torch.cat([ff_in.diag @ w for w in weights], dim=-1)  # j = i
        # W_out with the FF output's chain T'' applied to each row (linear, so
        # (h W_out) T'' = h (W_out T'')); None when the FF writes to the stream directly.
        self.out_written = out_norm(mlp.W_out, per_receiver=False) if out_norm.norms else None

    def chunk(
        self,
        by_key: Tensor,
        start: int,
        stop: int,
        rows: Tensor,
        cols: Tensor,
        need_ig: bool,
        need_written: bool,
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(IG_ij, written_ij)`` for the chunk's receivers: the FF's attribution and the same
        through the FF output's chain ``T''`` without the receivers' scales (None where not
        needed); ``[batch, key, chunk, d]`` each."""
        d_mlp = self.d_mlp
        gated = self.mlp.gated
        # u_ij W_in (, u_ij W_gate) up to the receiver's scale K_i: [batch, key, chunk, ·]
        hidden = torch.matmul(by_key, self.first[:, : by_key.shape[1]])
        k = self.coefficients.rows(start, stop)
        # Off the diagonal K_i and the IG coefficients act together: one multiply.
        hidden = feedforward.ig_hidden(
            hidden[..., :d_mlp],
            hidden[..., d_mlp:] if gated else None,
            k.scaled(self.ff_in.kappa[:, None, start:stop, None]),
            inplace=True,
        )
        diag_in = self.first_diag[:, start:stop]
        hidden[:, rows, cols] = feedforward.ig_hidden(
            diag_in[..., :d_mlp],
            diag_in[..., d_mlp:] if gated else None,
            self.coefficients.rows(start, stop, pairs=False),
        )
        ig = None
        if need_ig or (need_written and self.out_written is None):
            ig = torch.matmul(hidden, self.mlp.W_out)  # IG_ij
        written = None
        if need_written:
            written = ig if self.out_written is None else torch.matmul(hidden, self.out_written)
        return ig, written


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
    """Store ``‖v_ij‖``, ``Σ_j v_ij`` and ``v_ii`` of a chunk of pair vectors ``[b, key, q, d]``
    (the first keys; ``norms`` of the later ones stay zero)."""
    norms[:, start:stop, : vectors.shape[1]] = vectors.norm(dim=-1).transpose(1, 2)
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


def _parts(
    t: LayerTensors,
    pre_names: tuple[str, ...],
    post_names: tuple[str, ...],
    own: Tensor,
    context: Tensor,
    x: Tensor,
    b_O: Tensor,
) -> _Parts:
    """``post(pre(Σ_h α f) + δ x)`` in factored form (METHODS §2)."""
    pre, post = norm_chain(t, pre_names), norm_chain(t, post_names)
    diag = post(pre(own) + x)
    total = post(pre(context)) + diag
    bias = through_bias(post, through_bias(pre, b_O))
    kappa = pre.kappa(x) * post.kappa(x)
    return _Parts(chain=Request(x, pre, post), kappa=kappa, diag=diag, bias=bias, total=total)


def _forward(mlp: MLPSpec | FFModule, u: Tensor) -> Tensor:
    return mlp.forward(u)


def _targets(
    t: LayerTensors, ff_bias: Tensor, res_bias: Tensor, out_norm: NormChain, final: NormChain | None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per kept stream: the cached tensor the parts must rebuild, and the bias terms to add."""
    targets = {"ff": t["mlp_out"]}
    biases = {"ff": ff_bias}
    biases["res"] = through_bias(out_norm, ff_bias) + res_bias
    if final is not None:  # post-LN: RES2 feeds the post norms; the block output is after them
        targets["res"] = t["post_in"]
        targets["final"] = t["resid_post"]
        biases["final"] = through_bias(final, biases["res"])
    else:
        targets["res"] = t["resid_post"]
    return targets, biases


def _single_stream(t: LayerTensors, pattern: Tensor, names: list[str]) -> WholeLayerMaps:
    """Parallel blocks and blocks without a feed-forward part: the block output
    ``post(r + attn_out(A) + mlp_out(FF(mlp_in(r))))`` (or ``post(mid(r + attn_out(A)))``).
    The FF reads the layer input, so within the layer its output belongs to ``j = i``:
    ``FF(u_i) − FF(u^b_i)``, with ``FF(u^b_i)`` (the FF at the bias point) to no token."""
    layout = t.layout
    x = t["resid_pre"]
    pre = norm_chain(t, layout.attn_out)
    post = norm_chain(t, (*layout.mid, *layout.post) if not layout.parallel else layout.post)
    own_written = torch.zeros_like(x)
    bias_written = torch.zeros_like(x)
    if layout.parallel and layout.has_mlp:
        assert t.mlp is not None
        out_norm = norm_chain(t, layout.mlp_out)
        base = through_bias(norm_chain(t, layout.mlp_in), torch.zeros_like(x))
        bias_written = through_bias(out_norm, _forward(t.mlp, base))
        own_written = through_bias(out_norm, t["mlp_out"]) - bias_written
    request = Request(x + own_written, pre, post)
    result = residual.decompose(pattern, t.v, t.W_O, {"out": request}, mixed=t["attn_out"] - t.b_O)
    layer_map, ratio = result.maps["out"]
    # Σ_j parts + bias terms, with the attention part rebuilt from the pattern and values.
    mixed = attention.mixed_output(pattern, t.v, t.W_O)
    rebuilt = through_bias(pre, mixed + t.b_O) + x + own_written + bias_written
    rebuilt = through_bias(post, rebuilt)
    residual_ = _residual(rebuilt, t["resid_post"])
    return WholeLayerMaps(
        maps={name: layer_map for name in names},
        ratios={name: ratio for name in names},
        completeness={name: residual_ for name in names},
    )


def hidden_width(mlp: MLPSpec | FFModule | None) -> int:
    """Hidden units a token vector passes through in the feed-forward block (gated: both
    branches; 0 without one)."""
    if mlp is None:
        return 0
    if isinstance(mlp, FFModule):
        return mlp.width
    return (2 if mlp.gated else 1) * mlp.W_in.shape[1]


def points_for(t: LayerTensors, mlp: MLPSpec | FFModule, options: FFOptions) -> int | None:
    """Quadrature points of the layer's FF split (None: the closed form), METHODS §3."""
    points = options.quadrature_points
    if isinstance(mlp, FFModule) or mlp.gated:
        return points if points is not None else feedforward.DEFAULT_QUADRATURE_POINTS
    if points is None and not is_elementwise(mlp.act):
        raise NotImplementedError(
            f"Layer {t.layer}: the activation {mlp.act_name!r} is not element-wise, so the closed "
            "form of METHODS §3 does not apply."
        )
    return points


def _chunk_size(
    chunk: int | None, t: LayerTensors, batch: int, pos: int, heads: int, d: int, hidden: int
) -> int:
    per_query = chunk_bytes(batch, pos, 1, d, hidden)
    if chunk is None:
        chunk = max(MIN_CHUNK, DEFAULT_BUDGET_BYTES // per_query)
        free = available_bytes(t.device)
        if free is not None:  # long inputs: above the budget, but never above what is free
            fits = (free // 2 - fixed_bytes(batch, pos, heads, d, hidden)) // per_query
            chunk = min(chunk, max(1, fits))
        return max(1, min(pos, chunk))
    if chunk < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk}.")
    free = available_bytes(t.device)
    fixed = fixed_bytes(batch, pos, heads, d, hidden)
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
            f"feed-forward pass (batch {batch}, {pos} tokens, {hidden} hidden units) but "
            f"{free / 2**30:.1f} GiB are free; {advice}."
        )
    return chunk
