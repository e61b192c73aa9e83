"""The docs' supported-models table is the test matrix: it is regenerated from
``tiny_models`` and compared, and each layout's scopes column is checked against the adapter."""

from __future__ import annotations

from helpers import supported_models
from helpers.tiny_models import layout_of

import tl_normmix as nm
from tl_normmix.maps import SCOPES, UnsupportedScopeError


def test_docs_table_is_generated_from_the_test_matrix():
    text = supported_models.README.read_text()
    assert supported_models.readme_section(text) == supported_models.render(), (
        "docs/reference/models.md is out of date: run "
        "`.venv/bin/python tests/helpers/supported_models.py --write`"
    )


def test_scopes_column_matches_the_adapter(case, model):
    layout = nm.adapt(model).layout
    supported = []
    for scope in SCOPES.values():
        try:
            scope.check_layout(layout)
        except UnsupportedScopeError:
            continue
        supported.append(scope.name)
    assert tuple(supported) == supported_models.LAYOUT_SCOPES[layout_of(case)]
