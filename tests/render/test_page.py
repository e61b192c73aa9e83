"""The page: the bundle once, one closed container per view, escaping, snapshots, no network."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from helpers.handmade_maps import handmade

from tl_normmix.render import page, plots, views
from tl_normmix.render.page import Block, Row

SNAPSHOTS = Path(__file__).parent / "snapshots"
#: script or style sources that would reach the network
REMOTE = re.compile(
    r"""(<script[^>]*\ssrc\s*=\s*["']?\s*(https?:)?//)|(<link[^>]*\shref\s*=\s*["']?\s*(https?:)?//)"""
    r"""|(@import\s+(url\()?\s*["']?\s*(https?:)?//)|(\bimport\b[^;]*?from\s*["']\s*(https?:)?//)"""
    r"""|(\bimport\(\s*["']\s*(https?:)?//)""",
    re.IGNORECASE,
)


def _items():
    maps = handmade()
    return [
        views.heads(maps, "attn_n", 1),
        views.compare(maps, 0),
        views.reads_from(maps, "attnres_n", 0, -1),
        views.value_norms(maps, 1, batch=1),
        Block("<p>plain</p>", title="a block"),
    ]


def test_bundle_is_inlinable():
    source = page.bundle()
    assert len(source) > 500_000 and "var CircuitsVis" in source
    assert "</script" not in source.lower()
    assert "sourceMappingURL" not in source


def test_each_view_gets_its_own_closed_container_and_one_render_call():
    html = page.page(_items(), title="t", new_id=page.sequential_ids())
    assert html.count("var CircuitsVis") == 1  # the bundle, once
    ids = re.findall(r'<div class="tlnm-view" id="([^"]+)" data-component="(\w+)"></div>', html)
    assert [c for _, c in ids] == ["AttentionHeads"] + ["AttentionPattern"] * 3 + [
        "ColoredTokens",
        "ColoredTokensMulti",
    ]
    assert len({i for i, _ in ids}) == len(ids) == html.count("CircuitsVis.render(")
    assert not re.search(r"<div[^>]*/>", html)  # no self-closing divs (HTML ignores the slash)


def test_token_strings_cannot_break_out_of_the_script():
    html = page.fragment(_items(), new_id=page.sequential_ids(), inline_bundle=False)
    assert "</script>" in "".join(handmade().str_tokens[0])
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    assert len(scripts) == 6  # each render call is whole: the token did not end it early
    assert all(s.rstrip().endswith("})();") for s in scripts)
    assert "\\u003c/script\\u003e" in html


def test_props_round_trip_as_json():
    view = views.heads(handmade(), "attn_w", 0)
    html = page.fragment([view], new_id=page.sequential_ids(), inline_bundle=False)
    payload = re.search(r"CircuitsVis\.AttentionHeads, (\{.*\})\); \}", html).group(1)
    assert json.loads(payload) == json.loads(json.dumps(view.props))


def test_no_remote_sources_in_a_page_with_plots():
    maps = handmade()
    items = [*_items(), plots.figure_block(plots.mixing_ratios(maps), title="ratios")]
    html = page.page(items, title="t")
    assert REMOTE.search(html) is None
    assert "unpkg.com" not in html
    # the pattern catches what it must
    assert REMOTE.search('<script src="https://unpkg.com/x.js"></script>')
    assert REMOTE.search('import { render } from "https://unpkg.com/circuitsvis/esm.js";')
    assert REMOTE.search("<link rel=stylesheet href='//cdn.example/x.css'>")


def test_notebook_repr_is_a_fragment_with_the_bundle():
    view = views.heads(handmade(), "attn_w", 0)
    page.bundle_mode("once")  # the next output of the session carries the bundle
    html = view._repr_html_()
    assert html.startswith('<div class="tlnm">') and html.count("var CircuitsVis") == 1
    assert isinstance(views.compare(handmade(), 0), Row)
    assert Row((view,))._repr_html_().count('class="tlnm-view"') == 1


@pytest.mark.parametrize("name", ["page", "fragment"])
def test_snapshot(name):
    """The page's own markup (bundle left out) with fixed ids. To accept a deliberate change:
    TL_NORMMIX_UPDATE_SNAPSHOTS=1 pytest tests/render/test_page.py, then review the diff."""
    items = _items()
    if name == "page":
        html = page.page(items, title="snapshot", new_id=page.sequential_ids(), inline_bundle=False)
    else:
        html = page.fragment(items, new_id=page.sequential_ids(), inline_bundle=False)
    path = SNAPSHOTS / f"{name}.html"
    if os.environ.get("TL_NORMMIX_UPDATE_SNAPSHOTS"):
        path.write_text(html, encoding="utf-8")
    assert path.exists(), f"{path} missing: run with TL_NORMMIX_UPDATE_SNAPSHOTS=1"
    assert html == path.read_text(encoding="utf-8")
