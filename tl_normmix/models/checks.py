"""Self-verification: the identities that make a layer's maps exact, checked on the cache at hand.

Per computed layer (``mixing_maps(..., verify=True)``, the default):

* **attention output** — ``Σ_h Σ_j α^h_ij v^h_j W_O^h + b_O`` equals the pure attention output,
  on a sample of query rows per batch row (``O(rows·N·H·d_head)``: a small share of the maps);
* **each norm the maps use** — its cached scale equals ``sqrt(var + ε)`` (RMS: ``sqrt(mean x² +
  ε)``) of the input the layout feeds it, rebuilt from ``resid_pre``, ``attn_out`` (and
  ``mlp_out``) and the upstream scales, on every token (the maps divide by these scales); its
  cached input and output, where hooks hold them, equal the rebuilt input and
  ``γ ⊙ normalised + β`` on the sampled rows;
* **the causal mask** — a causal model's pattern has no weight on future keys, on the same sample
  of rows (TransformerLens 4.3 drops OpenAI-GPT's causal mask when an ``attention_mask`` is passed);
* **the feed-forward input** (``mlp.hook_in``), and for whole-layer scopes **the block output**,
  **the activation** (``act(hook_pre) = hook_post``) and **the feed-forward block** rebuilt from
  its weights on its input (``O(N·d·d_ff)``, against ``O(N²·d·d_ff)`` for the maps).

All on real tokens only (padding excluded), as ``max |rebuilt − cached| / max |cached|``. A failure
raises ``VerificationError`` naming the model, layer, identity, the measured error and the likely
cause, instead of returning maps that would be wrong; the residuals measured are kept in the
result (``MixingMaps.verification``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from jaxtyping import Bool
from torch import Tensor

from tl_normmix.decompose.blocks import LayerTensors, MLPSpec
from tl_normmix.decompose.composition import recompose
from tl_normmix.models.errors import VerificationError

__all__ = ["SAMPLE_ROWS", "sample_rows", "tolerance", "verify_layer"]

#: Query rows per batch row in the attention-output check.
SAMPLE_ROWS = 8

_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}

_EDITED = "a hook edited the cache's run (activation patching) or the cache mixes runs"
_FUTURE = (
    "TransformerLens ran it without its causal mask (TransformerLens 4.3 does so for OpenAI-GPT "
    "when an attention_mask is passed); the run is not the model's real computation. Run it "
    "without attention_mask (unpadded) or with another TransformerLens version; "
    "mixing_maps(..., verify=False) skips this check."
)


def tolerance(dtype: torch.dtype) -> float:
    """The largest relative error accepted for a cache of ``dtype`` (its rounding, with margin)."""
    return _TOLERANCE.get(dtype, 5e-2)


def verify_layer(
    t: LayerTensors,
    mask: Bool[Tensor, "batch pos"],
    *,
    through_ff: bool,
    precision: torch.dtype,
    model_name: str,
    causal: bool = False,
) -> dict[str, float]:
    """Check the identities of the module docstring that ``t`` holds the tensors for; return
    ``{identity: relative error}`` or raise ``VerificationError`` on the first that fails."""
    limit = tolerance(precision)
    padded = not bool(mask.all())
    pending: list[tuple[str, Tensor, str]] = []  # (identity, relative error (0-d), cause)

    def record(
        identity: str, rebuilt: Tensor, cached: Tensor, cause: str, rows: Tensor | None = None
    ) -> None:
        keep = None if not padded else mask if rows is None else mask[:, rows]
        pending.append((identity, _relative(rebuilt, cached, keep), cause))

    rows = sample_rows(mask)
    sampled = t.pattern[:, :, rows] if "pattern" in t else None  # [batch, head, rows, key]
    if causal and sampled is not None:
        future = _future(t.pos, t.device)  # [rows, key]
        if padded:  # real query rows and keys only
            future = future & mask[:, rows, None] & mask[:, None, :]
        weight = sampled.amax(dim=1).masked_fill(~future, 0.0)  # α ≥ 0
        pending.append(("causal mask", weight.flatten().amax(), _FUTURE))
    if sampled is not None and "v" in t and "attn_out" in t:
        rebuilt = _attention_rows(t, sampled, rows)
        cached = t["attn_out"][:, rows]
        record(
            "attention output",
            rebuilt,
            cached,
            "the pattern, the value vectors and the pure attention output do not belong together: "
            f"{_EDITED}, or TransformerLens changed a hook's meaning",
            rows,
        )
    if "resid_pre" in t and "attn_out" in t:
        full = through_ff and "resid_post" in t and ("mlp_out" in t or not t.layout.has_mlp)
        rec = recompose(t, through_ff=full)
        layout_cause = (
            f"the norm does not read what a {t.layout.name} block feeds it: {_EDITED} (e.g. on "
            "hook_resid_mid), or the block is not laid out as tl_normmix read it from the model"
        )
        for name, x in rec.norm_in.items():
            norm = t.norms[name]
            if norm.kind != "fixed":  # every token: the scales are what the maps divide by
                record(f"{name} scale", norm.scale_of(x), t.scale(name), layout_cause)
            if f"{name}.in" in t:  # sampled rows: a rewritten input shows in every scale above
                record(f"{name} input", x[:, rows], t[f"{name}.in"][:, rows], layout_cause, rows)
            if f"{name}.out" in t:  # γ and β do not depend on the token: sampled rows
                record(
                    f"{name} output",
                    norm.apply(x[:, rows], t.scale(name)[:, rows]),
                    t[f"{name}.out"][:, rows],
                    layout_cause,
                    rows,
                )
        if through_ff and rec.mlp_in is not None and "mlp_in" in t:
            record("feed-forward input", rec.mlp_in, t["mlp_in"], layout_cause)
        if rec.resid_post is not None:
            record("block output", rec.resid_post, t["resid_post"], layout_cause)
        if through_ff and t.mlp is not None and "mlp_out" in t:
            _check_feed_forward(t, rec.mlp_in, record)
    # one conversion for all the errors, then the first failure in order raises
    errors = torch.stack([error for _, error, _ in pending]).tolist() if pending else []
    residuals = {identity: error for (identity, _, _), error in zip(pending, errors, strict=True)}
    for (identity, _, cause), error in zip(pending, errors, strict=True):
        if not error <= limit:  # NaN fails too
            if identity == "causal mask":
                message = (
                    f"{model_name}, layer {t.layer}: the model is causal but its cached pattern "
                    f"puts weight {error:.3g} on future positions. Likely cause: {cause}"
                )
            else:
                message = (
                    f"{model_name}, layer {t.layer} ({t.layout.name} block): the {identity} "
                    f"rebuilt from the cache differs from the cached one (relative error "
                    f"{error:.3g}, tolerance {limit:.0e} for a "
                    f"{str(precision).removeprefix('torch.')} cache). Likely cause: {cause}. The "
                    "maps would be wrong, so none are returned; mixing_maps(..., verify=False) "
                    "skips this check."
                )
            raise VerificationError(message, layer=t.layer, identity=identity, error=error)
    return residuals


def _check_feed_forward(
    t: LayerTensors, rebuilt_in: Tensor | None, record: Callable[[str, Tensor, Tensor, str], None]
) -> None:
    mlp = t.mlp
    if isinstance(mlp, MLPSpec) and "mlp_pre" in t and "mlp_post" in t:
        linear = t["mlp_pre_linear"] if mlp.gated and "mlp_pre_linear" in t else None
        if not mlp.gated or linear is not None:
            record(
                "activation",
                mlp.hidden(t["mlp_pre"], linear),
                t["mlp_post"],
                f"the activation tl_normmix found on the model ({mlp.act_name}) does not "
                "reproduce mlp.hook_post from mlp.hook_pre",
            )
    u = t.get("mlp_in", rebuilt_in)
    if u is None or mlp is None:
        return
    with torch.no_grad():
        rebuilt = mlp.forward(u)
    record(
        "feed-forward output",
        rebuilt,
        t["mlp_out"],
        "the feed-forward block rebuilt from its weights on its input does not give its cached "
        f"output: {_EDITED}, or the weights changed after the run",
    )


def _relative(rebuilt: Tensor, cached: Tensor, mask: Tensor | None) -> Tensor:
    """``max |rebuilt − cached| / max |cached|`` over the positions ``mask`` keeps (all if None;
    float32: its rounding is far below every tolerance)."""
    a, b = rebuilt, cached
    if mask is not None:
        a, b = a[mask], b[mask]
    if b.numel() == 0:
        return a.new_zeros(())
    # amax over a flat view: a fast reduction on the CPU (.max() and the ∞-norm are ~15x slower)
    error = (a - b).abs_().flatten().amax()
    scale = b.abs().flatten().amax().clamp_min(1e-30)
    return error / scale


def sample_rows(mask: Tensor) -> Tensor:
    """Up to ``SAMPLE_ROWS`` query positions spread over the sequence (the last one included)."""
    return _rows(mask.shape[1], mask.device)


@functools.cache
def _future(pos: int, device: torch.device) -> Tensor:
    """``[sampled row, key]``: True where the key comes after the row (``sample_rows``)."""
    rows = _rows(pos, device)
    return torch.arange(pos, device=device)[None, :] > rows[:, None]


@functools.cache
def _rows(pos: int, device: torch.device) -> Tensor:
    if pos <= SAMPLE_ROWS:
        return torch.arange(pos, device=device)
    step = (pos - 1) / (SAMPLE_ROWS - 1)
    return torch.tensor([round(k * step) for k in range(SAMPLE_ROWS)], device=device)


def _attention_rows(t: LayerTensors, pattern: Tensor, rows: Tensor) -> Tensor:
    """``Σ_h Σ_j α^h_ij v^h_j W_O^h + b_O`` for query rows ``rows`` (``pattern`` holds them:
    ``[batch, head, rows, key]``): ``[batch, rows, d_model]``."""
    z = torch.matmul(pattern, t.v.transpose(1, 2))  # [batch, head, rows, d_head]
    heads, d_head, d_model = t.W_O.shape
    flat = z.permute(0, 2, 1, 3).reshape(*z.shape[:1], len(rows), heads * d_head)
    return flat @ t.W_O.reshape(heads * d_head, d_model) + t.b_O
