"""Shared fixtures: one parametrised table of tiny models drives the cross-checks. Helpers live
in the ``helpers`` package; test modules of the subfolders are importable by name (the real-model
acceptance tests reuse their checks on real weights)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
for _folder in ("models", "decompose", "maps", "render", "corpus", "interventions"):
    sys.path.insert(1, str(Path(__file__).parent / _folder))

from helpers import tiny_models  # noqa: E402  (after the path set-up above)


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_hf")


@pytest.fixture(params=tiny_models.cases(), ids=lambda c: c.id)
def case(request: pytest.FixtureRequest) -> tiny_models.Case:
    return request.param


@pytest.fixture
def model(case: tiny_models.Case, hf_root: Path):
    return tiny_models.build(case, hf_root)
