"""The readout after the last block: the final norm frozen at the real final stream, then a
target's unembedding column (minus a foil's) or a direction (methods.md#signed-attribution-to-a-
target). What the model does after the unembedding is read off the model: a linear scaling of the
logits (a TransformerLens bridge's output transform) is folded in, a softcap is reported, a linear
projection before the unembedding is folded in, and a prediction head with an activation is
refused for targets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_normmix.decompose import readout
from tl_normmix.models.adapter import ModelAdapter
from tl_normmix.models.errors import UnsupportedModelError

__all__ = ["Readout", "Target"]

Target = int | str | Sequence[int] | Sequence[str] | Tensor


@dataclass
class Readout:
    """The linear readout of the final stream: the final norm (frozen at the real stream's scale),
    then ``u`` (an unembedding difference or a direction) and a constant."""

    model: Any
    adapter: ModelAdapter
    u: Float[Tensor, "batch d_model"]
    constant: Float[Tensor, " batch"]
    target: Tensor | None
    foil: Tensor | None
    softcap: float | None
    slope: float = 1.0  # the model's linear output scaling (Granite, Cohere), folded into u

    @classmethod
    def of(
        cls,
        model: Any,
        adapter: ModelAdapter,
        target: Target | None,
        foil: Target | None,
        direction: Tensor | None,
        batch: int,
        device: torch.device,
    ) -> Readout:
        """The readout of ``target`` (minus ``foil``) or of ``direction``, one per batch row."""
        if direction is not None:
            if foil is not None:
                raise ValueError("A foil needs a target; a direction is read as it is.")
            u = torch.as_tensor(direction).detach().float().to(device)
            if u.ndim == 1:
                u = u.expand(batch, -1)
            if tuple(u.shape) != (batch, adapter.spec.block.d_model):
                raise ValueError(
                    f"direction has shape {tuple(u.shape)}: pass "
                    f"[d_model={adapter.spec.block.d_model}] or [batch={batch}, d_model]."
                )
            return cls(model, adapter, u, u.new_zeros(batch), None, None, None)
        if not adapter.spec.causal:
            raise UnsupportedModelError(
                f"{adapter.spec.model_name}: an encoder's masked-LM head is not linear (a dense "
                "layer, an activation and a norm before the unembedding), so a token's logit has "
                "no exact split. Pass direction= (read from the last block's output) instead."
            )
        extra = _head_modules(model)
        if extra:
            raise UnsupportedModelError(
                f"{adapter.spec.model_name}: between the final norm and the unembedding the model "
                f"applies {', '.join(extra)} (a prediction head with an activation), so a token's "
                "logit has no exact linear split. Pass direction= (read from the final normalised "
                "stream) instead."
            )
        cap = float(getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0)
        softcap = cap if cap > 0 else None
        slope = _output_slope(model, softcap)
        W_U = model.W_U.detach().float().to(device)
        b_U = getattr(model, "b_U", None)
        assert target is not None  # a direction was handled above
        ids = _token_ids(model, target, batch, "target", W_U.shape[1]).to(device)
        u = W_U[:, ids].T
        constant = b_U.detach().float().to(device)[ids] if b_U is not None else u.new_zeros(batch)
        foil_ids = None
        if foil is not None:
            foil_ids = _token_ids(model, foil, batch, "foil", W_U.shape[1]).to(device)
            u = u - W_U[:, foil_ids].T
            if b_U is not None:
                constant = constant - b_U.detach().float().to(device)[foil_ids]
        projection = _projection(model)
        if projection is not None:  # logits = (z Pᵀ + c) W_U: read z by P u, c by u
            weight, bias = projection
            if bias is not None:
                constant = constant + u @ bias.to(device)
            u = u @ weight.to(device)
        return cls(model, adapter, slope * u, slope * constant, ids, foil_ids, softcap, slope)

    def final_norm(self) -> Any:
        """The final norm, None where the readout takes the last block's output as it is."""
        if not self.adapter.spec.causal:  # an encoder's ln_final belongs to its task head
            return None
        return self.adapter.final_norm()

    def readout(self, stream: Tensor) -> tuple[Tensor, Tensor]:
        """``(ρ, constant)``: the readout vector of the final stream and the part of no token."""
        norm = self.final_norm()
        if norm is None:
            return self.u, self.constant
        norm = norm.to(stream.device)
        rho, bias = readout.pull_back(norm, norm.scale_of(stream), self.u)
        return rho, bias + self.constant

    def actual(self, stream: Tensor) -> Tensor:
        """The model's own readout: its final norm and unembedding modules on the final stream."""
        x = stream[:, None, :].to(_dtype_of(self.model))
        final = getattr(self.model, "ln_final", None)
        if final is not None and self.final_norm() is not None:
            x = final(x)
        if self.target is None:
            return (x[:, 0].float() * self.u).sum(-1)
        if self.target is not None and _projection(self.model) is not None:
            x = getattr(self.model, _PROJECTION)(x)
        logits = self.model.unembed(x)[:, 0].float() * self.slope
        rows = torch.arange(logits.shape[0], device=logits.device)
        value = logits[rows, self.target.to(logits.device)]
        if self.foil is not None:
            value = value - logits[rows, self.foil.to(logits.device)]
        return value.to(stream.device)


def _head_modules(model: Any) -> list[str]:
    """Modules with weights that the model applies after its blocks besides the final norm and the
    unembedding (a prediction head's dense layer and activation), in registration order."""
    children = list(model.named_children())
    names = [name for name, _ in children]
    if "blocks" not in names:
        return []
    after = children[names.index("blocks") + 1 :]
    return [
        name
        for name, module in after
        if name not in ("ln_final", "unembed", *_INPUT_SIDE, _PROJECTION)
        and any(p.numel() for p in module.parameters())
    ]


#: Modules a bridge registers after its blocks that act on the input (OPT's embedding projection).
_INPUT_SIDE = ("project_in",)
#: A linear map between the final norm and the unembedding (OPT-350m's ``project_out``).
_PROJECTION = "project_out"


def _projection(model: Any) -> tuple[Tensor, Tensor | None] | None:
    """``(weight [d_proj, d_model], bias)`` of the linear map before the unembedding, if any."""
    module = getattr(model, _PROJECTION, None)
    module = getattr(module, "original_component", module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return None
    bias = getattr(module, "bias", None)
    return weight.detach().float(), bias.detach().float() if isinstance(bias, Tensor) else None


def _output_slope(model: Any, softcap: float | None) -> float:
    """The model's linear scaling of its logits after the unembedding (``logits_scaling`` and the
    like: a TransformerLens bridge's output transform), read off the transform itself; a
    transform that is neither that nor that followed by the softcap is refused."""
    transform = getattr(getattr(model, "adapter", None), "apply_output_logits_transform", None)
    if not callable(transform):
        return 1.0
    probe = torch.tensor([1e-4, -2e-4, 3e-3, -0.5, 2.0, -7.0], dtype=torch.float64)
    slope = float(transform(probe[:1]) / probe[:1])
    expected = slope * probe
    if softcap is not None:
        expected = softcap * torch.tanh(expected / softcap)
    if not torch.allclose(transform(probe), expected, rtol=1e-6, atol=1e-9):
        raise UnsupportedModelError(
            f"{model.cfg.model_name}: the model transforms its logits after the unembedding in a "
            "way that is neither a scaling nor a softcap; a logit has no exact split here. Pass "
            "direction= (read from the final normalised stream) instead."
        )
    return slope


def _dtype_of(model: Any) -> torch.dtype:
    return next(model.parameters()).dtype


def _token_ids(model: Any, value: Target, batch: int, what: str, vocab: int) -> Tensor:
    """One token id per row from ids, single-token strings or a ``[batch]`` tensor."""
    items: list[Any]
    if isinstance(value, Tensor):
        items = value.reshape(-1).tolist()
    elif isinstance(value, (int, str)):
        items = [value]
    else:
        items = list(value)
    ids = [_one_token(model, item, what) for item in items]
    if len(ids) == 1:
        ids = ids * batch
    if len(ids) != batch:
        raise ValueError(f"{what}: {len(ids)} tokens for a batch of {batch} rows.")
    out = torch.tensor(ids, dtype=torch.long)
    if bool(((out < 0) | (out >= vocab)).any()):
        raise ValueError(f"{what}: token ids {ids} are outside the vocabulary (size {vocab}).")
    return out


def _one_token(model: Any, item: Any, what: str) -> int:
    if not isinstance(item, str):
        return int(item)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"{what}={item!r}: the model has no tokenizer; pass a token id.")
    ids = tokenizer.encode(item, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(
            f"{what}={item!r} is {len(ids)} tokens ({pieces}), not one: pass a single-token string "
            "(GPT-2-style tokenizers: mind the leading space, ' Mary') or a token id."
        )
    return int(ids[0])
