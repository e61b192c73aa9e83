"""``tl-normmix patch``: maps beside exact interventions, one offline page; the effects view."""

from __future__ import annotations

import re

import pytest
from helpers import tiny_models
from test_page import REMOTE

import tl_normmix as nm
from tl_normmix.cli import main
from tl_normmix.reports.patch_report import build_patch_report


def _count(html: str, component: str) -> int:
    return html.count(f'data-component="{component}"')


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_page_holds_agreement_curves_and_effects(family, hf_root):
    model = tiny_models.build(tiny_models.Case(family, "raw"), hf_root)
    html = build_patch_report(model, tiny_models.tokens(1, 6))
    assert html.startswith("<!DOCTYPE html>") and REMOTE.search(html) is None
    assert html.count('src="data:image/png;base64,') == 2  # agreement and faithfulness plots
    assert _count(html, "ColoredTokensMulti") == 2  # one effects view per layer
    table = re.search(r'<table class="tlnm-agreement">(.*?)</table>', html).group(1)
    for scoring in ("attn_w", "attn_n", "attnres_n", "attribution"):
        assert f"<th>{scoring}</th>" in table
    metric = "log p(" if family == "gpt2" else "share of the clean sentence embedding"
    assert metric in html


def test_effects_view_shows_the_effects_and_the_maps(hf_root):
    model = tiny_models.build(tiny_models.Case("gpt2", "raw"), hf_root)
    toks = tiny_models.tokens(1, 6)
    _, cache = tiny_models.run_with_cache(model, toks, names_filter=nm.hook_filter(model, "attn_n"))
    maps = nm.mixing_maps(model, cache, "attn_n")

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, 5]

    ko = nm.knock_out(model, toks, nm.edges(layers=[1]), metric)
    view = nm.views.effects(ko.as_maps(), maps, 1)
    assert view.component == "ColoredTokensMulti"
    values = view.props["values"]
    assert len(values) == 6 and len(values[0]) == 2
    for row, edge in zip(values, ko.edges, strict=True):
        assert abs(row[0] - float(ko.effect[ko.edges.index(edge), 0])) < 1e-3 * (1 + abs(row[0]))


@pytest.mark.real
def test_cli_writes_the_page(tmp_path, capsys):
    out = tmp_path / "patch.html"  # the packaged MiniLM, offline
    assert main(["patch", "--model", "minilm", "--text", "The cat sat.", "--out", str(out)]) == 0
    assert out.exists() and "wrote" in capsys.readouterr().out
    assert "share of the clean sentence embedding" in out.read_text()
    assert main(["patch", "--model", "minilm", "--text", "A", "--out", str(tmp_path)]) == 1
    assert "is a folder" in capsys.readouterr().err
