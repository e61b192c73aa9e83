"""Re-running only the positions from ``p`` on, reading the clean keys and values of the earlier
ones: the causal shortcut of interventions.

In a causal model nothing at positions ``< p`` depends on positions ``≥ p``. An edit of receivers
``≥ p`` therefore leaves every earlier position's activations — and in particular the keys and
values each later layer reads from them — exactly as in the clean run, so the edited run needs
only the suffix ``tokens[:, p:]`` with the clean prefix's keys and values: about ``N / (N − p)``
times less work than a full forward (15× for the last token of a 15-token prompt).

The prefix's keys and values come from the model's own cache machinery, filled by one forward of
the prefix: TransformerLens 2.x's ``HookedTransformerKeyValueCache`` (frozen, so one expanded copy
serves every forward of a batch size), or the Hugging Face cache a ``TransformerBridge`` hands
back (copied per forward, as the model appends to it). Newer ``transformers`` pass the cache to
the attention modules as ``cache=`` where TransformerLens 4.3's bridge reads
``past_key_values=``; a forward pre-hook on each attention module hands it over under both names.

Whether the shortcut reproduces the full forward is checked on the run at hand, once per prefix
length (``Prefixes.build``): the clean suffix must equal the full forward's output at those
positions. Where it does not (or the model has no usable cache), interventions run in full.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from tl_normmix.models.editing import Editor

__all__ = ["Prefix", "Prefixes"]

Hook = tuple[str, Callable[..., Any]]

#: Largest relative difference between the suffix run and the full forward that still counts as
#: the same computation (float32 rounding of different matrix shapes is ~1e-7).
TOLERANCE = 1e-4


class Prefixes:
    """The clean prefixes of one run (``tokens`` ``[batch, pos]``), built on demand per length ``p``
    and checked against the full forward's output ``clean`` (``hidden``: the last block's
    output instead of logits)."""

    def __init__(
        self,
        ed: Editor,
        tokens: Tensor,
        attention_mask: Tensor | None,
        clean: Tensor,
        hidden: bool,
    ) -> None:
        self.ed = ed
        self.tokens = tokens
        self.mask = attention_mask
        self.clean = clean
        self.hidden = hidden
        self.n_forwards = 0  # forwards spent building and checking prefixes

    @classmethod
    def of(
        cls,
        ed: Editor,
        tokens: Tensor,
        attention_mask: Tensor | None,
        clean: Tensor,
        hidden: bool,
    ) -> Prefixes | None:
        """The prefixes of this run, or None where the model is not causal or has no cache."""
        if not ed.adapter.spec.causal or ed.family not in ("bridge", "hooked"):
            return None
        return cls(ed, tokens, attention_mask, clean, hidden)

    def build(self, p: int) -> Prefix | None:
        """The prefix of length ``p`` (one forward of it, one of the clean suffix to check),
        or None where the shortcut does not reproduce the full forward on this run."""
        if not 0 < p < self.tokens.shape[1]:
            return None
        self.n_forwards += 2
        try:
            prefix = Prefix(self, p)
            with torch.no_grad():
                suffix = prefix.run(1, [])
        except Exception:  # a cache this model's forward does not take: run in full
            return None
        clean = self.clean[:, p:]
        scale = float(clean.abs().amax().clamp_min(1e-30))
        if float((suffix - clean).abs().amax()) > TOLERANCE * scale:
            return None
        prefix.clean_suffix = suffix
        return prefix


class Prefix:
    """The clean keys and values of positions ``< p``."""

    def __init__(self, owner: Prefixes, p: int) -> None:
        self.owner = owner
        self.p = p
        self.clean_suffix: Tensor | None = None
        ed, tokens, mask = owner.ed, owner.tokens, owner.mask
        self._expanded: tuple[int, Any] | None = None
        with torch.no_grad():
            if ed.family == "hooked":
                from transformer_lens.past_key_value_caching import (
                    HookedTransformerKeyValueCache,
                )

                cache = HookedTransformerKeyValueCache.init_cache(
                    ed.model.cfg, ed.device, tokens.shape[0]
                )
                ed.model(tokens[:, :p], attention_mask=self._mask(0, p), past_kv_cache=cache)
                self.cache = cache
            else:
                with _cache_under_both_names(ed.model):
                    _, cache = ed.model(
                        tokens[:, :p],
                        return_type="logits_and_cache",
                        **ed.mask_kwargs(None if mask is None else mask[:, :p]),
                    )
                if cache is None or cache.get_seq_length() != p:
                    raise RuntimeError("the bridge returned no filled cache")
                self.cache = cache

    def _mask(self, start: int, stop: int) -> Tensor:
        tokens, mask = self.owner.tokens, self.owner.mask
        if mask is None:
            return torch.ones_like(tokens[:, start:stop])
        return mask[:, start:stop].to(tokens.device)

    def baseline(self) -> Tensor:
        """The clean output with the suffix as this shortcut computes it."""
        assert self.clean_suffix is not None
        return self.full(self.clean_suffix)

    def full(self, suffix: Tensor) -> Tensor:
        """The whole output of the batch: the clean prefix, then ``suffix`` (positions p…)."""
        return torch.cat([self.owner.clean[:, : self.p], suffix], dim=1)

    def run(self, repeat: int, hooks: Sequence[Hook]) -> Tensor:
        """Positions ``p…`` of ``repeat`` copies of the batch (slot-major, like
        ``tokens.repeat(repeat, 1)``) with ``hooks``: ``[repeat·batch, pos − p, …]``."""
        ed, tokens = self.owner.ed, self.owner.tokens
        if ed.family == "hooked":  # TransformerLens 2.x: the new positions' mask only
            mask: Tensor | None = self._mask(self.p, tokens.shape[1]).repeat(repeat, 1)
            past = self._frozen(repeat)
            handing_over: AbstractContextManager[object] = nullcontext()
        else:  # the bridge: Hugging Face's mask covers the cached positions too
            given = self.owner.mask
            mask = None if given is None else given.repeat(repeat, 1)
            past, handing_over = self._copy(repeat), _cache_under_both_names(ed.model)
        with handing_over:
            suffix = tokens[:, self.p :].repeat(repeat, 1)
            return ed.run(suffix, hooks, attention_mask=mask, hidden=self.owner.hidden, past=past)

    def _frozen(self, repeat: int) -> Any:
        """TransformerLens 2.x: a frozen cache of ``repeat`` copies (reused while ``repeat``
        stays the same)."""
        if self._expanded is not None and self._expanded[0] == repeat:
            return self._expanded[1]
        from transformer_lens.past_key_value_caching import (
            HookedTransformerKeyValueCache,
            HookedTransformerKeyValueCacheEntry,
        )

        entries = [
            HookedTransformerKeyValueCacheEntry(
                past_keys=e.past_keys.repeat(repeat, 1, 1, 1),
                past_values=e.past_values.repeat(repeat, 1, 1, 1),
                frozen=True,
            )
            for e in self.cache.entries
        ]
        cache = HookedTransformerKeyValueCache(
            entries=entries,
            previous_attention_mask=self.cache.previous_attention_mask.repeat(repeat, 1),
            frozen=True,
        )
        self._expanded = (repeat, cache)
        return cache

    def _copy(self, repeat: int) -> Any:
        """The bridge: a copy of the Hugging Face cache with ``repeat`` copies of the batch."""
        cache = copy.deepcopy(self.cache)
        batch = self.owner.tokens.shape[0]
        if repeat > 1:
            rows = torch.arange(batch, device=self.owner.tokens.device).repeat(repeat)
            cache.batch_select_indices(rows)
        return cache


def _hand_over(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
        kwargs["past_key_values"] = kwargs["cache"]
    return args, kwargs


@contextmanager
def _cache_under_both_names(model: Any) -> Iterator[None]:
    """The bridge's attention modules see the cache as ``past_key_values`` whatever name
    ``transformers`` passes it under (whose deprecation notice for the old name is silenced
    here only)."""
    handles = [
        block.attn.register_forward_pre_hook(_hand_over, with_kwargs=True)
        for block in model.blocks
        if isinstance(getattr(block, "attn", None), torch.nn.Module)
    ]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="`past_key_values` is deprecated", category=FutureWarning
            )
            yield
    finally:
        for handle in handles:
            handle.remove()
