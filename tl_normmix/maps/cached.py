"""``mixing_maps``: the maps of a cached run, and ``hook_filter``: the ``names_filter`` that
caches only what they read. ``maps.streaming.run_mixing_maps`` computes the same maps during the
forward pass instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_normmix.maps.engine import MapsBuilder, MapsOptions, compute_layer, plan_maps, roles_of
from tl_normmix.maps.method import check_roles
from tl_normmix.maps.result import MixingMaps
from tl_normmix.maps.scopes import resolve_scopes
from tl_normmix.models.adapter import adapt

__all__ = ["HookFilter", "hook_filter", "mixing_maps"]


class HookFilter:
    """A ``names_filter`` for ``run_with_cache``: true for the hooks in ``hook_names``."""

    def __init__(self, hook_names: frozenset[str]) -> None:
        self.hook_names = hook_names

    def __call__(self, name: str) -> bool:
        return name in self.hook_names

    def __repr__(self) -> str:
        return f"HookFilter({len(self.hook_names)} hooks)"


def hook_filter(
    model: Any,
    scopes: str | Iterable[str] = ("attn_w",),
    *,
    value_norms: bool = False,
    verify: bool = True,
) -> HookFilter:
    """A ``names_filter`` for ``run_with_cache`` that keeps only the hooks ``scopes`` need (and,
    with ``verify``, the few more the self-check of ``mixing_maps`` reads); its ``hook_names``
    lists them.

    >>> _, cache = model.run_with_cache(tokens, names_filter=hook_filter(model, "attn_w"))
    ... # doctest: +SKIP
    """
    adapter = adapt(model)
    wanted = resolve_scopes(scopes)
    roles = roles_of(wanted, adapter, value_norms)
    if verify:
        roles |= {r for r in check_roles(list(wanted), adapter.layout) if adapter.has_role(r)}
    return HookFilter(frozenset(adapter.hook_names(roles)))


def mixing_maps(
    model: Any,
    cache: Any,
    scopes: str | Iterable[str] = ("attn_w",),
    *,
    layers: int | Sequence[int] | None = None,
    attention_mask: Tensor | None = None,
    tokens: Tensor | None = None,
    value_norms: bool = False,
    verify: bool = True,
    options: Any = (),
    progress: bool = False,
) -> MixingMaps:
    """Compute the context-mixing maps of ``scopes`` from ``cache`` (docs: concepts, scopes).

    Args:
        model: the TransformerLens model that produced ``cache`` (``TransformerBridge``,
            ``HookedTransformer`` or ``HookedEncoder``).
        cache: its ``ActivationCache``, e.g. from
            ``run_with_cache(tokens, names_filter=hook_filter(model, scopes))``.
        scopes: scope names; ``nm.list_scopes()`` lists them.
        layers: a layer or layers to compute (default: all).
        attention_mask: ``[batch, pos]``, 1 for real tokens, 0 for padding. Default: derived from
            ``tokens`` the way TransformerLens builds it for a padded batch (its
            ``get_attention_mask`` with the tokenizer's pad token and padding side), else none.
        tokens: the token ids, kept in the result for labels.
        value_norms: also return ``‖f^h(x_j)‖`` per layer, head and source token.
        verify: check, per layer, the identities the maps rest on and raise
            ``VerificationError`` instead of returning maps where one fails.
        options: the requested methods' options — one instance or a tuple, one per options type
            (``nm.AltiOptions(eps=1e-6)``, ``nm.FFOptions(quadrature_points=64)``); the others
            keep their defaults.
        progress: a progress bar over the layers.
    """
    adapter = adapt(model)
    plan = plan_maps(adapter, scopes, MapsOptions.of(value_norms, verify, options))
    layer_list = adapter.check_layers(layers)
    builder = MapsBuilder(plan, len(layer_list))
    mask: Tensor | None = None
    bar = tqdm(layer_list, desc="mixing maps", unit="layer", disable=not progress)
    with torch.no_grad():  # maps are read, not differentiated (a model's FF keeps no graph)
        for index, layer in enumerate(bar):
            result, mask = compute_layer(adapter, plan, cache, layer, mask, attention_mask, tokens)
            builder.add(index, result, layer)
    assert mask is not None
    return builder.build(adapter, tuple(layer_list), mask, tokens)
