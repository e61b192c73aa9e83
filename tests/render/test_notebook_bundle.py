"""A notebook of many views carries the CircuitsVis bundle once (``bundle_mode("once")``, the
default), every view still renders in the saved notebook's one page, and ``"inline"`` carries it
in every output. The notebook is executed by a real kernel, as in a user's session."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from tl_normmix.render import page

MARKER = "CircuitsVis"  # the bundle defines this global once per copy: var CircuitsVis=
N_VIEWS = 20


def _notebook(mode: str) -> nbformat.NotebookNode:
    setup = (
        "import torch\n"
        "import tl_normmix as nm\n"
        "from tl_normmix.maps import MixingMaps\n"
        f"nm.views.bundle_mode({mode!r})\n"
        "n = 6\n"
        "seed = torch.Generator().manual_seed(0)\n"
        "weights = torch.softmax(torch.randn(2, 1, 3, n, n, generator=seed), -1)\n"
        "maps = MixingMaps(\n"
        "    layers=(0, 1), maps={'attn_w': weights.mean(2)}, heads={'attn_w': weights},\n"
        "    ratios={}, mask=torch.ones(1, n, dtype=torch.bool), convention='raw',\n"
        "    model_name='toy')\n"
    )
    cells = [nbformat.v4.new_code_cell(setup)]
    cells += [
        nbformat.v4.new_code_cell(f"nm.views.heads(maps, 'attn_w', layer={k % 2})")
        for k in range(N_VIEWS)
    ]
    return nbformat.v4.new_notebook(cells=cells)


def _bundles(nb: nbformat.NotebookNode) -> tuple[int, int]:
    """(outputs carrying the bundle, views shown)."""
    carrying = views = 0
    for cell in nb.cells[1:]:
        html = "".join(o.get("data", {}).get("text/html", "") for o in cell.get("outputs", []))
        views += html.count('class="tlnm-view"')
        carrying += page.bundle()[:2000] in html
    return carrying, views


@pytest.mark.parametrize("mode", ["once", "inline"])
def test_a_notebook_of_views_carries_the_bundle_as_its_mode_says(mode, tmp_path):
    nb = _notebook(mode)
    NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    carrying, views = _bundles(nb)
    assert views == N_VIEWS
    assert carrying == (1 if mode == "once" else N_VIEWS)
    path = tmp_path / f"{mode}.ipynb"
    nbformat.write(nb, path)
    size = path.stat().st_size
    bundle = len(page.bundle().encode())
    if mode == "once":  # the bundle once, plus a few kB per view
        assert bundle < size < bundle + N_VIEWS * 20_000
    else:
        assert size > N_VIEWS * bundle


def test_bundle_mode_is_checked_and_once_resends_after_a_reset():
    with pytest.raises(ValueError, match="choose from"):
        page.bundle_mode("everywhere")  # type: ignore[arg-type]
    page.bundle_mode("once")
    view = page.View("ColoredTokens", {"tokens": ["a"], "values": [1.0]})
    first, second = view._repr_html_(), view._repr_html_()
    assert page.bundle()[:2000] in first and page.bundle()[:2000] not in second
    page.bundle_mode("once")
    assert page.bundle()[:2000] in view._repr_html_()
    page.bundle_mode("cdn")
    assert "unpkg.com/circuitsvis@" in view._repr_html_()
    page.bundle_mode("once")
