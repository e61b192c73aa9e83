"""The registry: every scope and method tl_normmix computes, each one ``Method`` that owns itself.

Methods are registered explicitly, here, by family (``maps.methods``): each family module holds
its entries beside the kernels that compute them. Adding a method means its math module
(``tl_normmix.decompose``) and its entry (a ``Method`` in a family module, with its kernel and
options); nothing else in the engine changes.

>>> import tl_normmix as nm
>>> [m.name for m in nm.list_scopes()][:3]
['attn_w', 'attn_n', 'attnres_w']
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tl_normmix.maps.method import Method, UnsupportedScopeError
from tl_normmix.maps.methods import attention, peers, whole_layer
from tl_normmix.maps.methods.peers import AltiOptions, ValueZeroingOptions
from tl_normmix.maps.methods.whole_layer import WHOLE_LAYER_SCOPES, FFOptions

__all__ = [
    "SCOPES",
    "WHOLE_LAYER_SCOPES",
    "AltiOptions",
    "FFOptions",
    "UnsupportedScopeError",
    "ValueZeroingOptions",
    "list_scopes",
    "resolve_options",
    "resolve_scopes",
]

#: Every scope by name, in the order of the docs: attention block, whole layer, the peers'.
SCOPES: dict[str, Method] = {
    m.name: m for m in (*attention.METHODS, *whole_layer.METHODS, *peers.METHODS)
}


def list_scopes() -> tuple[Method, ...]:
    """Every scope and method: ``name``, ``description``, ``has_heads``, ``options`` (the
    dataclass of its options, or None), ``layouts()`` (block layout → None where it applies,
    else why not), ``docs`` (where the docs define it) and ``computed_by``."""
    return tuple(SCOPES.values())


def resolve_scopes(scopes: str | Iterable[str]) -> tuple[Method, ...]:
    """Validate scope names (a single name or several), keeping their order, without repeats."""
    names = (scopes,) if isinstance(scopes, str) else tuple(scopes)
    if not names:
        raise ValueError(f"No scope requested; valid scopes: {', '.join(SCOPES)}.")
    unknown = [n for n in names if n not in SCOPES]
    if unknown:
        raise ValueError(
            f"Unknown scope(s) {', '.join(map(repr, unknown))}; valid scopes: {', '.join(SCOPES)}."
        )
    return tuple(SCOPES[n] for n in dict.fromkeys(names))


def resolve_options(methods: Iterable[Method], given: Iterable[Any]) -> dict[str, Any]:
    """Each method's options: the instance of its options type among ``given``, else its
    defaults. An instance no requested method takes is refused."""
    chosen = list(methods)
    by_type: dict[type, Any] = {}
    for value in given:
        kind = type(value)
        if kind in by_type:
            raise ValueError(f"Two {kind.__name__} given; pass one.")
        if not any(m.options is kind for m in chosen):
            takers = [m.name for m in SCOPES.values() if m.options is kind]
            raise TypeError(
                f"{value!r} is an option of {takers or 'no scope'}, none of which is requested "
                f"({[m.name for m in chosen]})."
            )
        by_type[kind] = value
    return {
        m.name: by_type.get(m.options, m.default_options()) if m.options is not None else None
        for m in chosen
    }
