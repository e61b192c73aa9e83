"""``mixing_maps``: the maps of a cached run, and ``hook_filter``: the ``names_filter`` that
caches only what they read (METHODS.md §1–4). ``forward_maps.run_mixing_maps`` computes the same
maps during the forward pass instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from tl_normmix.layer_engine import MapsBuilder, compute_layer, plan_maps, roles_of
from tl_normmix.maps import MixingMaps
from tl_normmix.models.adapter import adapt
from tl_normmix.scopes import check_roles, resolve_scopes

__all__ = ["hook_filter", "mixing_maps"]


def hook_filter(
    model: Any,
    scopes: str | Iterable[str] = ("attn_w",),
    *,
    value_norms: bool = False,
    verify: bool = True,
) -> Callable[[str], bool]:
    """A ``names_filter`` for ``run_with_cache`` that keeps only the hooks ``scopes`` need (and,
    with ``verify``, the few more the self-check of ``mixing_maps`` reads).

    >>> _, cache = model.run_with_cache(tokens, names_filter=hook_filter(model, "attn_w"))
    ... # doctest: +SKIP
    """
    adapter = adapt(model)
    wanted = resolve_scopes(scopes)
    roles = roles_of(wanted, adapter, value_norms)
    if verify:
        roles |= {r for r in check_roles(wanted, adapter.layout) if adapter.has_role(r)}
    names = frozenset(adapter.hook_names(roles))

    def names_filter(name: str) -> bool:
        return name in names

    names_filter.hook_names = names  # type: ignore[attr-defined]
    return names_filter


def mixing_maps(
    model: Any,
    cache: Any,
    scopes: str | Iterable[str] = ("attn_w",),
    *,
    layers: int | Sequence[int] | None = None,
    attention_mask: Tensor | None = None,
    tokens: Tensor | None = None,
    value_norms: bool = False,
    quadrature_points: int | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    verify: bool = True,
    alti_floor: float = 0.0,
    alti_eps: float = 0.0,
    alti_value_bias: str = "source",
) -> MixingMaps:
    """Compute the context-mixing maps of ``scopes`` from ``cache`` (METHODS.md §1–3).

    Args:
        model: the TransformerLens model that produced ``cache`` (``TransformerBridge``,
            ``HookedTransformer`` or ``HookedEncoder``).
        cache: its ``ActivationCache``, e.g. from
            ``run_with_cache(tokens, names_filter=hook_filter(model, scopes))``.
        scopes: scope names; see ``tl_normmix.SCOPES``.
        layers: a layer or layers to compute (default: all).
        attention_mask: ``[batch, pos]``, 1 for real tokens, 0 for padding. Default: derived from
            ``tokens`` the way TransformerLens builds it for a padded batch (its
            ``get_attention_mask`` with the tokenizer's pad token and padding side), else none.
        tokens: the token ids, kept in the result for labels.
        value_norms: also return ``‖f^h(x_j)‖`` per layer, head and source token.
        quadrature_points: whole-layer scopes: None uses the exact closed form for element-wise
            activations and 32 Gauss–Legendre points for gated MLPs and the generic path; an
            integer uses quadrature with that many points everywhere.
        chunk_size: whole-layer scopes: queries per chunk (default: fit 256 MiB of working
            memory); a chunk that cannot fit in free memory is refused with one that would.
        progress: show a progress bar over the layers (tqdm; stderr or the notebook).
        verify: check, per layer, the identities the maps rest on (``models.checks``) and raise
            ``VerificationError`` instead of returning maps where one fails.
        alti_floor: ``heads["alti"]``: the least contribution of a part before the parts of a row
            are normalised (llm-transparency-tool uses 1e-5, which gives exact zeros such as
            future tokens a small share); 0 keeps them zero.
        alti_eps: ALTI (map and routes): the L1 distance is ``‖T − y + eps‖₁``; the reference
            implementations use ``torch.nn.functional.pairwise_distance``, whose default adds
            ``1e-6`` to every component — pass 1e-6 to reproduce them number for number; 0 is
            METHODS §4's exact ``‖y − T‖₁``.
        alti_value_bias: ALTI (map and routes): ``"source"`` — ``b_V W_O`` inside each source's
            ``f`` (METHODS §1, logit-explanations); ``"bias"`` — attributed to no part, as
            llm-transparency-tool does (it folds value biases into ``b_O``).
    """
    adapter = adapt(model)
    plan = plan_maps(
        adapter,
        scopes,
        value_norms=value_norms,
        verify=verify,
        quadrature_points=quadrature_points,
        chunk_size=chunk_size,
        alti_floor=alti_floor,
        alti_eps=alti_eps,
        alti_value_bias=alti_value_bias,
    )
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
