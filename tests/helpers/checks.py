"""Assertions and readers the tests share: the identities' relative tolerance, every role an
adapter can read, one layer's tensors from a full cache."""

from __future__ import annotations

import torch


def assert_rel_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, what: str = ""
) -> None:
    """``max|actual − expected| ≤ rtol · max|expected|`` (the identities' 1e-5 relative)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.numel() == 0:
        return
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rtol * max(scale, 1e-12), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def all_roles(adapter) -> set[str]:
    """Every role the adapter can read for this model (the multiplier's fixed scale included)."""
    from tl_normmix.decompose.blocks import MULTIPLIER

    roles = set(adapter.sources)
    if MULTIPLIER in adapter.layout.norms:
        roles.add(f"{MULTIPLIER}.scale")
    return roles


def read_layers(model, toks: torch.Tensor, layers=None, mask: torch.Tensor | None = None):
    """The adapter's view of every role of ``layers`` (default: all), from one full cache (run
    with the padding ``mask``, if given)."""
    import tl_normmix as nm
    from helpers.tiny_models import run_with_cache

    adapter = nm.adapt(model)
    roles = all_roles(adapter)
    _, cache = run_with_cache(model, toks, mask)
    chosen = range(adapter.spec.n_layers) if layers is None else layers
    return adapter, [adapter.read(cache, layer, roles) for layer in chosen]
