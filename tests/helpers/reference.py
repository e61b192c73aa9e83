"""A direct, obviously-correct reference: every per-pair vector materialised (float64).

For one layer's tensors (``read_layers``) and any layout: the attention parts ``Σ_h α^h_ij
f^h(x_j)`` ``[batch, i, j, d]``, pushed through the layout's chains of norms with each receiver's
cached scale (methods.md#notation), the residual added on the diagonal (§2), the feed-forward output
split by a brute-force Riemann-sum integrated gradient with autograd (§3), and the rest of the
block. Each stage comes with its bias terms (``[batch, i, d]``), so ``parts.sum(j) + bias`` must
equal what the model computed.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from tl_normmix.decompose.blocks import FFModule, MLPSpec

STEPS = 300  # midpoint rule: error ~ 1/STEPS² for the smooth activations here

Stage = tuple[torch.Tensor, torch.Tensor]  # (parts [b, i, j, d], bias [b, i, d])


def attention(t, mask: torch.Tensor) -> Stage:
    """``Σ_h α^h_ij f^h(x_j)`` with masked keys and queries dropped, and ``b_O``."""
    pair = mask[:, None, :, None] & mask[:, None, None, :]
    alpha = t.pattern.double().masked_fill(~pair, 0.0)
    f = torch.einsum("bjhd,hdm->bjhm", t.v.double(), t.W_O.double())
    parts = torch.einsum("bhij,bjhm->bijm", alpha, f)
    return parts, t.b_O.double().expand(parts.shape[0], parts.shape[1], -1)


def through(t, names: tuple[str, ...], stage: Stage) -> Stage:
    """The parts through the norms ``names`` (frozen scale at the receiver), the bias through
    the norms themselves (β included)."""
    parts, bias = stage
    for name in names:
        norm = _double(t.norms[name])
        scale = t.scale(name).double()
        parts = norm.linear(parts, scale[:, :, None, :])
        bias = norm.apply(bias, scale)
    return parts, bias


def plus_residual(t, stage: Stage, extra: torch.Tensor | None = None) -> Stage:
    """``δ_ij x_i`` (and ``extra_i``) added on the diagonal: the receiver's own stream."""
    parts, bias = stage
    own = t["resid_pre"].double() + (extra if extra is not None else 0.0)
    eye = torch.eye(parts.shape[1], dtype=torch.bool)[None, :, :, None]
    return parts + eye * own[:, :, None, :], bias


def attention_block(t, which: str, mask: torch.Tensor) -> Stage:
    """``attn`` (the pure attention output), ``attn_res`` or ``attn_res_ln``
    (methods.md#attention-weights-and-norms)."""
    stage = attention(t, mask)
    if which == "attn":
        return stage
    layout = t.layout
    stage = plus_residual(t, through(t, layout.attn_out, stage))
    return stage if which == "attn_res" else through(t, layout.ff_input, stage)


def whole_layer(t, mask: torch.Tensor) -> dict[str, Stage]:
    """``ff`` (IG of the FF), ``res`` (+ its chain + RES2) and ``final`` (post-LN: + LN2), or
    ``out`` only for parallel and attention-only blocks (methods.md#the-feed-forward-block)."""
    layout = t.layout
    ff = _double_ff(t.mlp) if t.mlp is not None else None
    if layout.parallel or not layout.has_mlp:
        stage = through(t, layout.attn_out, attention(t, mask))
        if ff is None:
            return {"out": through(t, (*layout.mid, *layout.post), plus_residual(t, stage))}
        zero = torch.zeros_like(t["resid_pre"].double())
        base = through(t, layout.mlp_in, (zero[:, :, None, :], zero))[1]
        written = through(t, layout.mlp_out, (ff.forward(base)[:, :, None, :], ff.forward(base)))
        own = through(t, layout.mlp_out, (zero[:, :, None, :], t["mlp_out"].double()))[1]
        parts, bias = plus_residual(t, stage, own - written[1])
        return {"out": through(t, layout.post, (parts, bias + written[1]))}
    u, u_bias = attention_block(t, "attn_res_ln", mask)
    ig = riemann(ff, u, u_bias)
    ff_bias = ff.forward(u_bias)
    stages = {"ff": (ig, ff_bias)}
    res, res_bias = through(
        t, layout.mid, plus_residual(t, through(t, layout.attn_out, attention(t, mask)))
    )
    written, written_bias = through(t, layout.mlp_out, (ig, ff_bias))
    stages["res"] = (written + res, written_bias + res_bias)
    if layout.post:
        stages["final"] = through(t, layout.post, stages["res"])
    return stages


def riemann(ff, parts: torch.Tensor, bias: torch.Tensor, steps: int = STEPS) -> torch.Tensor:
    """IG_ij for parts ``[b, i, j, d]`` and bias ``[b, i, d]``: the midpoint rule with autograd
    Jacobians along ``bias + t Σ_j parts`` — on each piece between a router's switches, plus each
    jump shared by the sources' parts of the score gap's gradient, where ``ff`` has a router."""
    total = parts.sum(2)
    switches = _switch_points(ff, bias, total)
    t, w = _pieces(switches, bias, steps)  # [b, i, s]
    points = bias[:, :, None, :] + t[..., None] * total[:, :, None, :]  # [b, i, s, d]
    # Rows of every token's Jacobian by plain autograd (modules and custom autograd functions
    # such as BLOOM's GELU need not support vmap).
    jac = _token_jacobians(ff.forward, points.reshape(-1, points.shape[-1]))
    jac = jac.view(*points.shape[:3], *jac.shape[1:])  # [b, i, s, d_out, d_in]
    ig = torch.einsum("bijd,bis,bisod->bijo", parts, w, jac)
    for (b, i), taus in switches.items():
        for tau, entering, leaving in taus:
            ig[b, i] += _jump_shares(
                ff, bias[b, i], total[b, i], parts[b, i], tau, entering, leaving
            )
    return ig


#: Scan of the path for a router's switches, bisection steps, and the half-width of the interval
#: across which a jump is measured (float32 modules: wide enough that their router flips too).
SCAN, BISECT, JUMP = 4096, 60, 1e-5


def _switch_points(ff, bias: torch.Tensor, total: torch.Tensor) -> dict:
    """``(b, i) -> [(τ, entering, leaving)]``: where the router's choice changes along the path,
    by a fine scan and bisection (one expert swapped per scan cell, else the reference refuses)."""
    router = getattr(ff, "router", None)
    if router is None:
        return {}
    router = router.to(torch.float64)
    grid = torch.linspace(0, 1, SCAN + 1, dtype=torch.float64)
    found: dict = {}
    for b in range(bias.shape[0]):
        for i in range(bias.shape[1]):
            chosen = router.chosen(bias[b, i] + grid[:, None] * total[b, i])
            for cell in (chosen[1:] != chosen[:-1]).any(-1).nonzero().flatten().tolist():
                lo, hi = float(grid[cell]), float(grid[cell + 1])
                before = chosen[cell]
                for _ in range(BISECT):
                    mid = (lo + hi) / 2
                    same = bool((router.chosen(bias[b, i] + mid * total[b, i]) == before).all())
                    lo, hi = (mid, hi) if same else (lo, mid)
                if hi < 1e-12:
                    continue  # experts tied at the bias point (no bias anywhere): not a switch
                after = chosen[cell + 1]
                entering, leaving = (after & ~before).nonzero(), (before & ~after).nonzero()
                assert len(entering) == len(leaving) == 1, "two switches in one scan cell"
                found.setdefault((b, i), []).append(((lo + hi) / 2, int(entering), int(leaving)))
    return found


def _pieces(switches: dict, bias: torch.Tensor, steps: int):
    """Midpoint nodes and weights ``[b, i, s]``: ``steps`` per piece between switches (pieces
    padded with zero weight to the most any receiver has)."""
    most = 1 + max((len(v) for v in switches.values()), default=0)
    mid = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    t = torch.zeros(*bias.shape[:2], most * steps, dtype=torch.float64)
    w = torch.zeros_like(t)
    for b in range(bias.shape[0]):
        for i in range(bias.shape[1]):
            bounds = [0.0, *(tau for tau, _, _ in switches.get((b, i), [])), 1.0]
            for k, (lo, hi) in enumerate(itertools.pairwise(bounds)):
                t[b, i, k * steps : (k + 1) * steps] = lo + (hi - lo) * mid
                w[b, i, k * steps : (k + 1) * steps] = (hi - lo) / steps
    return t.to(bias.dtype), w.to(bias.dtype)


def _jump_shares(ff, base, total, parts, tau: float, entering: int, leaving: int) -> torch.Tensor:
    """``[j, d_out]``: the jump ``F(τ⁺) − F(τ⁻)`` times each source's share ``∇d·u_j / ∇d·U``
    of the score gap ``d = s_entering − s_leaving`` (its gradient by autograd)."""
    ends = torch.stack([base + (tau + JUMP) * total, base + (tau - JUMP) * total])
    after, before = ff.forward(ends)
    jump = after - before
    router = ff.router.to(torch.float64)
    u = (base + tau * total).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        scores = router.scores(router.logits(u))
        (grad,) = torch.autograd.grad(scores[entering] - scores[leaving], u)
    share = parts @ grad / (total @ grad)
    return share[:, None] * jump[None, :]


def _token_jacobians(forward, points: torch.Tensor) -> torch.Tensor:
    """``[n, d_out, d_in]`` Jacobians of a token-wise map at ``n`` points: one backward pass per
    output unit over all tokens at once (tokens do not interact)."""
    leaf = points.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = forward(leaf)
        rows = [
            torch.autograd.grad(out[:, o].sum(), leaf, retain_graph=True)[0]
            for o in range(out.shape[-1])
        ]
    return torch.stack(rows, dim=1)


def _double(norm):
    return dataclasses.replace(
        norm,
        weight=norm.weight.double(),
        bias=norm.bias.double() if norm.bias is not None else None,
    )


def _double_ff(mlp):
    if isinstance(mlp, FFModule):
        return FFModule(
            forward=lambda u: mlp.forward(u.float()).to(u.dtype),
            description=mlp.description,
            width=mlp.width,
            forward_ad=mlp.forward_ad,
            router=mlp.router,
        )
    assert isinstance(mlp, MLPSpec)
    return dataclasses.replace(
        mlp,
        **{
            f.name: getattr(mlp, f.name).double()
            for f in dataclasses.fields(mlp)
            if isinstance(getattr(mlp, f.name), torch.Tensor)
        },
    )


# -- the peers' per-layer maps (methods.md#the-peers-methods)
# -------------------------------------------------------


def globenc(t, mask: torch.Tensor) -> Stage:
    """GlobEnc's vectors: ``attnresln`` (LN1 output space) through LN2's frozen map, no FF."""
    stage = plus_residual(t, through(t, t.layout.attn_out, attention(t, mask)))
    return through(t, (*t.layout.mid, *t.layout.post), stage)


def alti_parts(t, mask: torch.Tensor) -> Stage:
    """``T_i(x_j)`` and the bias terms of the attention sublayer's resultant ``y_i``."""
    stage = plus_residual(t, through(t, t.layout.attn_out, attention(t, mask)))
    return through(t, t.layout.mid, stage)


def l1_contributions(parts: torch.Tensor, whole: torch.Tensor, floor: float = 0.0, eps=0.0):
    """``max(‖y‖₁ − ‖part − y + eps‖₁, floor)`` for parts ``[..., d]`` against ``whole``
    broadcast (``eps`` as ``torch.nn.functional.pairwise_distance``)."""
    return (whole.abs().sum(-1) - (parts - whole + eps).abs().sum(-1)).clamp_min(floor)


def alti(t, mask: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """ALTI's per-layer map ``[b, i, j]``, rows normalised over real keys."""
    parts, bias = alti_parts(t, mask)
    whole = parts.sum(2) + bias
    c = l1_contributions(parts, whole[:, :, None], eps=eps)
    c = c.masked_fill(~(mask[:, :, None] & mask[:, None, :]), 0.0)
    return c / c.sum(-1, keepdim=True).clamp_min(1e-300)


def alti_routes(t, mask: torch.Tensor, floor: float = 0.0, eps: float = 0.0, fold=False):
    """Per (head, source) parts and the residual part, normalised together per receiver:
    ``([b, h, i, j], [b, i])``; each head's term pushed through the chains on its own.
    ``fold``: ``b_V W_O`` left out of the parts (llm-transparency-tool's folded value biases)."""
    pair = mask[:, None, :, None] & mask[:, None, None, :]
    alpha = t.pattern.double().masked_fill(~pair, 0.0)
    v = t.v.double() - (t.value_bias.double() if fold else 0.0)
    f = torch.einsum("bjhd,hdm->bjhm", v, t.W_O.double())
    per_head = torch.einsum("bhij,bjhm->bijhm", alpha, f)  # [b, i, j, h, d]
    b, n, _, h, d = per_head.shape
    flat = per_head.reshape(b, n, n * h, d)
    zero = torch.zeros(b, n, d, dtype=torch.float64)
    heads, _ = through(t, (*t.layout.attn_out, *t.layout.mid), (flat, zero))
    residual, _ = through(t, t.layout.mid, (t["resid_pre"].double()[:, :, None], zero))
    parts, bias = alti_parts(t, mask)
    whole = parts.sum(2) + bias
    c_heads = l1_contributions(heads, whole[:, :, None], floor, eps).view(b, n, n, h)
    c_heads = c_heads.masked_fill(~mask[:, None, :, None], 0.0)
    c_res = l1_contributions(residual[:, :, 0], whole, floor, eps)
    total = c_heads.sum(dim=(2, 3)) + c_res
    return (c_heads / total[:, :, None, None]).permute(0, 3, 1, 2), c_res / total


def carried_block(t, W_V, b_V, stage: Stage, mask: torch.Tensor) -> Stage:
    """One block on a stream given as parts over input tokens (methods.md#the-peers-methods,
    whole-model decomposition), in float64 with every pair vector explicit: values split through the
    frozen attention-input norm, mixed by the real weights, the rest of the block as ``whole_layer``
    with the stream's own parts in place of ``δ_ij x_i`` (the FF by the Riemann IG)."""
    layout = t.layout
    parts, bias = stage
    P, Pb = through(t, layout.attn_in, (parts, bias))
    V = torch.einsum("bkjd,hde->bkjhe", P, W_V.double())
    Vb = torch.einsum("bkd,hde->bkhe", Pb, W_V.double()) + b_V.double()
    groups = t.block.n_heads // W_V.shape[0]
    V, Vb = V.repeat_interleave(groups, dim=3), Vb.repeat_interleave(groups, dim=2)
    pair = mask[:, None, :, None] & mask[:, None, None, :]
    alpha = t.pattern.double().masked_fill(~pair, 0.0)
    W_O = t.W_O.double()
    A = torch.einsum("bhik,bkjhe,hem->bijm", alpha, V, W_O)
    Ab = torch.einsum("bhik,bkhe,hem->bim", alpha, Vb, W_O) + t.b_O.double()
    A, Ab = through(t, layout.attn_out, (A, Ab))
    ff = _double_ff(t.mlp) if t.mlp is not None and layout.has_mlp else None
    if layout.parallel:
        stream = (parts + A, bias + Ab)
        branch = (parts, bias)
    else:
        stream = through(t, layout.mid, (parts + A, bias + Ab))
        branch = stream
    if ff is not None:
        U, Ub = through(t, layout.mlp_in, branch)
        W, Wb = through(t, layout.mlp_out, (riemann(ff, U, Ub), ff.forward(Ub)))
        stream = (stream[0] + W, stream[1] + Wb)
    return through(t, layout.post, stream)
