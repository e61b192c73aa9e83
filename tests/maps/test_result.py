"""``MixingMaps`` shows what it holds in a line (and a table in a notebook), never its tensors."""

from __future__ import annotations

from helpers.handmade_maps import handmade


def test_short_repr_and_html_table():
    maps = handmade()
    text = repr(maps)
    assert text.startswith("MixingMaps(") and "tensor(" not in text and len(text) < 400
    for part in ("layers=0–1 (2)", "batch × tokens=2 × 4 (padded)", "attn_w", "raw weights"):
        assert part in text, (part, text)
    html = maps._repr_html_()
    assert html.startswith("<table>") and "tensor(" not in html and "per head" in html
