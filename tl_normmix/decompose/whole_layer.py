"""Whole-layer maps of one layer: through the feed-forward block
(methods.md#the-feed-forward-block).

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

from collections.abc import Callable, Iterator, Mapping
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
    "MIN_CHUNK",
    "WHOLE_LAYER_STAGES",
    "WholeLayerMaps",
    "chunk_bytes",
    "fixed_bytes",
    "hidden_width",
    "points_for",
    "whole_layer_maps",
]

#: Receivers per chunk even where that exceeds the memory budget (long inputs): with one
#: receiver the first matmul runs as a matrix-vector product per key, several times slower.
MIN_CHUNK = 4

#: The stages computed here.
WHOLE_LAYER_STAGES = frozenset({Stage.FF, Stage.FF_RES, Stage.OUT})


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


def whole_layer_maps(
    t: LayerTensors,
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    mask: Bool[Tensor, "batch pos"],
    stages: Mapping[str, Stage],
    *,
    chunk: int | None = None,
    block_rows: int | None = None,
    quadrature_points: int | None = None,
    ff_sink: Callable[[int, int, Tensor], None] | None = None,
) -> WholeLayerMaps:
    """Maps, ratios and completeness residuals named by ``stages`` (``FF``, ``FF_RES``, ``OUT``)
    for one layer (``pattern`` already masked). Padded cells are zero, padded tokens NaN.
    ``chunk``: receivers per chunk of the pair loop (``chunk_bytes`` each; None: all at once);
    ``block_rows``: parallel and attention-only blocks, rows per chunk of ``residual.decompose``;
    ``quadrature_points``: as ``points_for``. ``ff_sink(start, stop, ig)`` receives each chunk's
    ``IG_ij`` vectors ``[batch, key, chunk, d]`` (receivers ``start:stop``) for analyses that
    need the vectors, not only their norms; the keys are the first ones up to the last any
    receiver of the chunk attends to (the later keys' vectors are zero)."""
    layout = t.layout
    if layout.parallel or not layout.has_mlp:
        assert set(stages.values()) <= {Stage.OUT}, "refused by scopes"
        return _single_stream(t, pattern, list(stages), block_rows)
    split = _Split(t, pattern, quadrature_points)
    streams = split.streams(set(stages.values()))
    pos = pattern.shape[-1]
    chunk = chunk or pos
    ends = attention.attended_ends(pattern)
    for start in range(0, pos, chunk):
        stop = min(start + chunk, pos)
        # keys from `hi` on are attended by no receiver of the chunk: their pair vectors are zero
        hi = max(stop, *ends[start:stop])
        rows = torch.arange(start, stop, device=pattern.device)  # receivers i of the chunk
        for stage, vectors in split.chunk(start, stop, hi, streams, ff_sink is not None):
            if stage is Stage.FF and ff_sink is not None:
                ff_sink(start, stop, vectors)
            if stage in streams:
                streams[stage].collect(vectors, start, stop, rows, rows - start)
            del vectors
    targets = split.targets()
    result = WholeLayerMaps({}, {}, {})
    for name, stage in stages.items():
        kept, (target, bias) = streams[stage], targets[stage]
        result.maps[name] = kept.norms  # stages may share a tensor (copied by MapsBuilder)
        result.ratios[name] = _ratio(kept.sums, kept.diags)
        result.completeness[name] = _residual(kept.sums + bias, target)
    return result


@dataclass
class _Kept:
    """``‖v_ij‖``, ``Σ_j v_ij`` and ``v_ii`` of one stream of pair vectors, a chunk at a time."""

    norms: Tensor  # [batch, query, key]
    sums: Tensor  # [batch, query, d]
    diags: Tensor  # [batch, query, d]

    def collect(self, vectors: Tensor, start: int, stop: int, rows: Tensor, cols: Tensor) -> None:
        """Store a chunk of pair vectors ``[b, key, q, d]`` (the first keys; the norms of the
        later ones stay zero)."""
        self.norms[:, start:stop, : vectors.shape[1]] = vectors.norm(dim=-1).transpose(1, 2)
        self.sums[:, start:stop] = vectors.sum(dim=1)
        self.diags[:, start:stop] = vectors[:, rows, cols]


class _Split:
    """One layer's pair vectors through the feed-forward block, in factored form (see the module
    docstring): the parts of the FF input and of the stream after the attention branch, the FF's
    closed form (or the generic path) and the chains after it."""

    def __init__(self, t: LayerTensors, pattern: Tensor, quadrature_points: int | None) -> None:
        layout, mlp = t.layout, t.mlp
        assert mlp is not None
        self.t, self.pattern, self.mlp = t, pattern, mlp
        self.points = points_for(t, mlp, quadrature_points)
        f = attention.source_vectors(t.v, t.W_O)  # [batch, key, head, d]
        own = attention.self_part(pattern.diagonal(dim1=-2, dim2=-1), f)
        context = t["attn_out"] - t.b_O - own
        x = t["resid_pre"]
        b_O = t.b_O.expand_as(x)
        self.ff_in = _parts(t, layout.attn_out, layout.ff_input, own, context, x, b_O)  # u_ij
        self.res = (
            _parts(t, layout.attn_out, layout.mid, own, context, x, b_O)
            if layout.mlp_in
            else self.ff_in
        )
        self.out_norm = norm_chain(t, layout.mlp_out)
        self.out_kappa = self.out_norm.kappa(x)
        self.final = norm_chain(t, layout.post) if layout.post else None
        self.final_kappa = self.final.kappa(x) if self.final is not None else None
        self.g_in = _transform(self.ff_in.chain, f)  # T f^h_j, per source and head
        self.g_res = self.g_in if self.res is self.ff_in else _transform(self.res.chain, f)
        self.closed = (
            _ClosedForm(mlp, self.ff_in, self.g_in, self.points, self.out_norm)
            if isinstance(mlp, MLPSpec)
            else None
        )

    def streams(self, wanted: set[Stage]) -> dict[Stage, _Kept]:
        """Zeroed storage per wanted stage; without post norms ``OUT`` is the ``FF_RES`` stream."""
        batch, _, pos, _ = self.pattern.shape
        d = self.t.W_O.shape[-1]

        def zeros() -> _Kept:
            new = self.pattern.new_zeros
            return _Kept(new(batch, pos, pos), new(batch, pos, d), new(batch, pos, d))

        kept: dict[Stage, _Kept] = {s: zeros() for s in wanted if s in (Stage.FF, Stage.FF_RES)}
        if Stage.OUT in wanted:
            if self.final is not None:
                kept[Stage.OUT] = zeros()
            else:
                kept[Stage.OUT] = kept.setdefault(Stage.FF_RES, zeros())
        return kept

    def chunk(
        self, start: int, stop: int, hi: int, streams: dict[Stage, _Kept], sink: bool
    ) -> Iterator[tuple[Stage, Tensor]]:
        """The chunk's pair vectors ``[batch, key, chunk, d]`` stage by stage, each built from
        the last: ``IG_ij``, after the second residual, after the post norms."""
        need_ig = Stage.FF in streams or sink
        need_res = Stage.FF_RES in streams or (Stage.OUT in streams and self.final is None)
        need_final = self.final is not None and Stage.OUT in streams
        need_written = need_res or need_final
        rows = torch.arange(start, stop, device=self.pattern.device)
        cols = rows - start
        pattern = self.pattern[:, :, start:stop, :hi]
        by_key = pattern.transpose(-1, -2).contiguous().permute(0, 2, 3, 1)
        if self.closed is not None:
            ig, written = self.closed.chunk(by_key, start, stop, rows, cols, need_ig, need_written)
        else:
            ig = self._generic(by_key, start, stop, rows, cols, hi)
            written = self.out_norm(ig, per_receiver=False) if self.out_norm.norms else ig
        if need_ig:
            assert ig is not None
            yield Stage.FF, ig
        del ig
        if not need_written:
            return
        assert written is not None
        if self.out_norm.norms:  # the FF output's own chain, linearised at the receiver
            written = written * self.out_kappa[:, None, start:stop, None]
        res = self.res
        vectors = torch.matmul(by_key, self.g_res[:, :hi]) * res.kappa[:, None, start:stop, None]
        vectors[:, rows, cols] = res.diag[:, start:stop]
        vectors += written
        del written
        if need_res:
            yield Stage.FF_RES, vectors
        if need_final:
            assert self.final is not None and self.final_kappa is not None
            vectors = self.final(vectors, per_receiver=False)
            yield Stage.OUT, vectors * self.final_kappa[:, None, start:stop, None]

    def _generic(
        self, by_key: Tensor, start: int, stop: int, rows: Tensor, cols: Tensor, hi: int
    ) -> Tensor:
        """``IG_ij`` of a feed-forward module without a closed form (``generic_ff``)."""
        assert isinstance(self.mlp, FFModule) and self.points is not None
        ff_in = self.ff_in
        u = torch.matmul(by_key, self.g_in[:, :hi]) * ff_in.kappa[:, None, start:stop, None]
        u[:, rows, cols] = ff_in.diag[:, start:stop]
        return generic_ff.integrated_gradients(
            self.mlp, u, ff_in.total[:, start:stop], ff_in.bias[:, start:stop], self.points
        )

    def targets(self) -> dict[Stage, tuple[Tensor, Tensor]]:
        """Per stage: the cached tensor its parts must rebuild, and the bias terms to add."""
        t = self.t
        ff_bias = self.mlp.forward(self.ff_in.bias)
        res_bias = through_bias(self.out_norm, ff_bias) + self.res.bias
        out = {Stage.FF: (t["mlp_out"], ff_bias)}
        if self.final is None:
            out[Stage.FF_RES] = out[Stage.OUT] = (t["resid_post"], res_bias)
        else:  # post-LN: RES2 feeds the post norms; the block output is after them
            out[Stage.FF_RES] = (t["post_in"], res_bias)
            out[Stage.OUT] = (t["resid_post"], through_bias(self.final, res_bias))
        return out


class _ClosedForm:
    """The closed-form IG of an ``MLPSpec`` over a chunk of pairs
    (methods.md#the-feed-forward-block)."""

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
    """``post(pre(Σ_h α f) + δ x)`` in factored form (methods.md#residual-and-layer-norm)."""
    pre, post = norm_chain(t, pre_names), norm_chain(t, post_names)
    diag = post(pre(own) + x)
    total = post(pre(context)) + diag
    bias = through_bias(post, through_bias(pre, b_O))
    kappa = pre.kappa(x) * post.kappa(x)
    return _Parts(chain=Request(x, pre, post), kappa=kappa, diag=diag, bias=bias, total=total)


def _single_stream(
    t: LayerTensors, pattern: Tensor, names: list[str], rows: int | None
) -> WholeLayerMaps:
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
        bias_written = through_bias(out_norm, t.mlp.forward(base))
        own_written = through_bias(out_norm, t["mlp_out"]) - bias_written
    request = Request(x + own_written, pre, post)
    result = residual.decompose(
        pattern, t.v, t.W_O, {"out": request}, mixed=t["attn_out"] - t.b_O, chunk_size=rows
    )
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


def points_for(
    t: LayerTensors, mlp: MLPSpec | FFModule, quadrature_points: int | None
) -> int | None:
    """Quadrature points of the layer's FF split (None: the closed form),
    methods.md#the-feed-forward-block: None asks for the closed form of element-wise activations and
    ``feedforward.DEFAULT_QUADRATURE_POINTS`` Gauss–Legendre points for gated blocks and the generic
    path; an integer asks for quadrature with that many points for every block."""
    points = quadrature_points
    if isinstance(mlp, FFModule) or mlp.gated:
        return points if points is not None else feedforward.DEFAULT_QUADRATURE_POINTS
    if points is None and not is_elementwise(mlp.act):
        raise NotImplementedError(
            f"Layer {t.layer}: the activation {mlp.act_name!r} is not element-wise, so the closed "
            "form of integrated gradients does not apply: ask for quadrature with "
            "FFOptions(quadrature_points=32)."
        )
    return points
