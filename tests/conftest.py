"""Shared fixtures: one parametrised table of tiny models drives the cross-checks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from tl_normmix.corpus import conllu_texts

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
# Test modules of the subfolders are importable by name (the real-model acceptance tests reuse
# their checks on real weights).
for _folder in ("models", "decompose", "render", "corpus", "interventions"):
    sys.path.insert(1, str(Path(__file__).parent / _folder))

import tiny_models  # noqa: E402  (after the path set-up above)


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_hf")


@pytest.fixture(params=tiny_models.cases(), ids=lambda c: c.id)
def case(request: pytest.FixtureRequest) -> tiny_models.Case:
    return request.param


@pytest.fixture
def model(case: tiny_models.Case, hf_root: Path):
    return tiny_models.build(case, hf_root)


SHARED = Path(__file__).resolve().parents[2] / "shared"
EWT_DEV = SHARED / "data" / "ud" / "UD_English-EWT" / "en_ewt-ud-dev.conllu"


def ewt_sentences(n: int) -> list[str]:
    """The first ``n`` ``# text =`` lines of UD English-EWT dev, read from ``../shared``."""
    if not EWT_DEV.exists():
        raise FileNotFoundError(
            f"{EWT_DEV} is missing: the tests expect ../shared beside the clone."
        )
    return conllu_texts(EWT_DEV, n)


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
    from tiny_models import run_with_cache

    import tl_normmix as nm

    adapter = nm.adapt(model)
    roles = all_roles(adapter)
    _, cache = run_with_cache(model, toks, mask)
    chosen = range(adapter.spec.n_layers) if layers is None else layers
    return adapter, [adapter.read(cache, layer, roles) for layer in chosen]
