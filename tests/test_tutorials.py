"""The tutorials run top to bottom (their own cells assert what they show) and show their views."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.real

TUTORIALS = sorted((Path(__file__).parents[1] / "tutorials").glob("*.ipynb"))


def test_there_are_six_tutorials():
    assert [p.name[:2] for p in TUTORIALS] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(path, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        "commit tutorials without outputs (they carry a 1.3 MB bundle per view)"
    )
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()  # raises CellExecutionError on any failing cell, asserts included
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any('class="tlnm-view"' in h and "var CircuitsVis" in h for h in html)
    assert all("unpkg.com" not in h for h in html)
    assert any("image/png" in o.get("data", {}) for o in outputs)  # a plot
