"""Running a model with edits of its attention: the TransformerLens side of interventions.

Every intervention of methods.md#interventions-on-edges edits the per-head mixed values ``z^h_i =
Σ_j α^h_ij v^h_j`` (``attn.hook_z``, ``[batch, pos, head, d_head]``): removing, renormalising,
patching or mean-ablating the term of an edge is a closed-form change of ``z^h_i``, and the
attention output is ``Σ_h z^h_i W_O^h + b_O``, so the edit of the output is exactly the edit of the
edge's term ``p_e = α^h_ij v^h_j W_O^h``. ``hook_z`` is live on every family (an edit propagates),
unlike the pattern — TransformerLens fires ``hook_pattern`` after the fact on BERT, RoBERTa,
GPT-Neo, GPT-J, OPT and ModernBERT, where edits of it are discarded — and unlike ``attn.o.hook_out``
on many bridges. Grouped-query attention needs nothing special: ``z`` is per query head.

An ``Editor`` (one per model) runs the model from tokens or from the residual stream entering a
layer (``start_at_layer``, used only where it reproduces the full forward on the run at hand:
TransformerLens's is not exact on BERT or BLOOM) and returns logits or the final hidden state.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tl_normmix.models.adapter import ModelAdapter, adapt
from tl_normmix.models.errors import UnsupportedModelError

__all__ = ["Editor", "HiddenStateMetric", "editor", "on_hidden_states", "reads_hidden"]

Hook = tuple[str, Callable[..., Any]]


class HiddenStateMetric:
    """A metric that reads the final hidden states ``[batch, pos, d_model]`` (the last block's
    output) instead of the logits (``on_hidden_states``)."""

    def __init__(self, metric: Callable[[Tensor], Tensor]) -> None:
        self.metric = metric
        functools.update_wrapper(self, metric)

    def __call__(self, hidden: Tensor, /) -> Tensor:
        return self.metric(hidden)


def on_hidden_states(metric: Callable[[Tensor], Tensor]) -> HiddenStateMetric:
    """``metric`` reading the final hidden states ``[batch, pos, d_model]`` (the last block's
    output) instead of the logits: for encoders without a trained head.

    >>> metric = nm.on_hidden_states(lambda h: h[:, 0].norm(dim=-1))  # doctest: +SKIP
    """
    return HiddenStateMetric(metric)


def reads_hidden(metric: Callable[[Tensor], Tensor]) -> bool:
    """Whether ``metric`` reads the final hidden states (``on_hidden_states``)."""
    return isinstance(metric, HiddenStateMetric)


class _Finished(Exception):
    """Ends a forward from inside a hook (``Editor.run_until``)."""


@dataclass
class _Facts:
    pattern_before_z: bool  # hook_pattern fires before hook_z (the live pattern can be read)


_EDITORS: weakref.WeakKeyDictionary[Any, Editor] = weakref.WeakKeyDictionary()


def editor(model: Any) -> Editor:
    """The ``Editor`` of ``model`` (built once per model and adapter)."""
    adapter = adapt(model)
    cached = _EDITORS.get(model)
    if cached is None or cached.adapter is not adapter:
        cached = Editor(model, adapter)
        _EDITORS[model] = cached
    return cached


class Editor:
    """Hook names and forwards for edits of ``attn.hook_z``; see the module docstring."""

    def __init__(self, model: Any, adapter: ModelAdapter) -> None:
        self.model = model
        self.adapter = adapter
        self.family = adapter.family
        self.n_layers = adapter.spec.n_layers
        self.n_heads = adapter.spec.block.n_heads
        for layer in (0, self.n_layers - 1):
            if f"blocks.{layer}.attn.hook_z" not in model.hook_dict:
                raise UnsupportedModelError(
                    f"{adapter.spec.model_name}: no attn.hook_z in layer {layer}, so its attention "
                    "cannot be edited per head; interventions are not available (maps still are)."
                )
        self._facts: _Facts | None = None

    # -- hook names ------------------------------------------------------------------------------
    @staticmethod
    def z(layer: int) -> str:
        return f"blocks.{layer}.attn.hook_z"

    @staticmethod
    def pattern(layer: int) -> str:
        return f"blocks.{layer}.attn.hook_pattern"

    @staticmethod
    def v(layer: int) -> str:
        return f"blocks.{layer}.attn.hook_v"

    @staticmethod
    def resid_pre(layer: int) -> str:
        return f"blocks.{layer}.hook_resid_pre"

    def final(self) -> str:
        """The hook holding the last block's output (for hidden-state metrics)."""
        return self.adapter.hook_names(["resid_post"], [self.n_layers - 1])[0]

    def clean_hooks(self, layers: Sequence[int]) -> list[str]:
        """Hooks of a clean run that edits of ``layers`` read (pattern, v, z, resid_pre)."""
        names = (self.pattern, self.v, self.z, self.resid_pre)
        return [name(layer) for layer in layers for name in names]

    def v_heads(self, v: Tensor) -> Tensor:
        """Cached values ``[batch, pos, kv_head, d_head]`` (any bridge's axis order) expanded to
        the query heads: ``[batch, pos, head, d_head]``."""
        if self.adapter.probe is not None and self.adapter.probe.v_heads_first:
            v = v.transpose(1, 2)  # the MLA bridge's [batch, head, pos, d_head]
        groups = self.n_heads // v.shape[2]
        return v if groups == 1 else v.repeat_interleave(groups, dim=2)

    # -- facts read once -------------------------------------------------------------------------
    @property
    def pattern_before_z(self) -> bool:
        """Whether ``hook_pattern`` fires before ``hook_z`` (then one forward can read the live
        pattern of a layer before editing its ``z``)."""
        if self._facts is None:
            order: list[str] = []
            hooks = [
                (self.pattern(0), lambda t, hook: order.append("pattern")),
                (self.z(0), lambda t, hook: order.append("z")),
            ]
            tokens = torch.tensor([[11, 12, 13]], device=self.device)
            with torch.no_grad():
                self.run(tokens, hooks)
            self._facts = _Facts(pattern_before_z=order[:1] == ["pattern"])
        return self._facts.pattern_before_z

    @property
    def device(self) -> torch.device:
        return torch.device(getattr(self.model.cfg, "device", None) or "cpu")

    # -- forwards --------------------------------------------------------------------------------
    def mask_kwargs(self, attention_mask: Tensor | None) -> dict[str, Any]:
        """The keyword passing a padding mask to this model's forward (and ``run_with_cache``)."""
        if attention_mask is None:
            return {}
        key = "one_zero_attention_mask" if self.family == "encoder" else "attention_mask"
        return {key: attention_mask}

    def run(
        self,
        tokens: Tensor,
        hooks: Sequence[Hook] = (),
        *,
        attention_mask: Tensor | None = None,
        hidden: bool = False,
        start_at_layer: int | None = None,
        resid: Tensor | None = None,
        past: Any = None,
    ) -> Tensor:
        """One forward with ``hooks``: logits ``[batch, pos, vocab]``, or (``hidden``) the last
        block's output ``[batch, pos, d_model]``. With ``start_at_layer``, ``resid`` is the
        residual stream entering that block (``tokens`` still give the positions and padding).
        ``past`` is the model's key-value cache of earlier positions (``models.prefix``)."""
        captured: dict[str, Tensor] = {}
        extra: list[Hook] = []
        if hidden:

            def keep(tensor: Tensor, hook: Any) -> None:
                captured["hidden"] = tensor

            extra.append((self.final(), keep))
        kwargs = self.mask_kwargs(attention_mask)
        if past is not None:
            kwargs["past_kv_cache" if self.family == "hooked" else "past_key_values"] = past
        if start_at_layer is not None:
            assert resid is not None
            kwargs["start_at_layer"] = start_at_layer
            if self.family == "hooked":
                kwargs["tokens"] = tokens
            inputs: Tensor = resid
        else:
            inputs = tokens
        with self.model.hooks(fwd_hooks=[*hooks, *extra]):
            out = self.model(inputs, **kwargs)
        if hidden:
            return captured["hidden"]
        return out if isinstance(out, Tensor) else out.logits

    def run_until(
        self,
        tokens: Tensor,
        hooks: Sequence[Hook],
        done: Callable[[], bool],
        *,
        attention_mask: Tensor | None = None,
    ) -> bool:
        """One forward with ``hooks`` that ends as soon as ``done()`` holds after a hook has run
        (no later block, no unembedding); True if it ended early."""

        def watched(hook_fn: Callable[..., Any]) -> Callable[..., Any]:
            def run(tensor: Tensor, hook: Any) -> Any:
                out = hook_fn(tensor, hook)
                if done():
                    raise _Finished
                return out

            return run

        try:
            with self.model.hooks(fwd_hooks=[(name, watched(fn)) for name, fn in hooks]):
                self.model(tokens, return_type=None, **self.mask_kwargs(attention_mask))
        except _Finished:
            return True
        return False

    def start_is_exact(
        self, tokens: Tensor, attention_mask: Tensor | None, resid: dict[int, Tensor], clean: Tensor
    ) -> bool:
        """Whether starting at a middle layer from the cached residual reproduces ``clean`` (the
        full forward's output) on this run: checked per call, as padding can matter."""
        if self.family == "encoder" or not resid:
            return False
        layer = sorted(resid)[len(resid) // 2]
        if layer == 0:
            return True
        hidden = clean.shape[-1] == self.adapter.spec.block.d_model and clean.ndim == 3
        try:
            with torch.no_grad():
                out = self.run(
                    tokens,
                    attention_mask=attention_mask,
                    hidden=hidden,
                    start_at_layer=layer,
                    resid=resid[layer],
                )
        except Exception:
            return False
        scale = float(clean.abs().amax().clamp_min(1e-30))
        return float((out - clean).abs().amax()) <= 1e-4 * scale
