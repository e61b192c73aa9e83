"""The report as a user sees it: headless Chromium opens it from disk with the network off.

Needs the system Chromium (Debian package ``chromium``; ``make browser`` installs it) driven by
playwright; the path comes from ``TL_NORMMIX_CHROMIUM`` (default ``/usr/bin/chromium``). A
missing browser fails the test (it is not skipped): CI must run it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from tl_normmix.cli import main

pytestmark = [pytest.mark.real, pytest.mark.browser]

CHROMIUM = Path(os.environ.get("TL_NORMMIX_CHROMIUM", "/usr/bin/chromium"))
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
TEXT = "The keys to the cabinet are on the table, and the cat sat on the mat."


@pytest.fixture(scope="module")
def opened(tmp_path_factory):
    """Generate the README's report, open it offline, wait until every view has mounted."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), (
        f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)"
    )
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["report", "--model", "all-MiniLM-L6-v2", "--text", TEXT, "--out", str(out)]) == 0
    requests, problems = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        context = browser.new_context(offline=True, viewport={"width": 1400, "height": 1000})

        def route(route):
            requests.append(route.request.url)
            if route.request.url.startswith(("file:", "data:")):
                route.continue_()
            else:
                route.abort()

        context.route("**/*", route)
        page = context.new_page()
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda err: problems.append(str(err)))
        page.goto(out.as_uri())
        page.wait_for_function(
            "() => [...document.querySelectorAll('.tlnm-view')]"
            ".every(e => e.childElementCount > 0)",
            timeout=90_000,
        )
        page.wait_for_timeout(500)
        state = page.evaluate(
            """() => ({
                views: [...document.querySelectorAll('.tlnm-view')].map(e => ({
                    component: e.dataset.component,
                    children: e.querySelectorAll('*').length,
                    height: e.getBoundingClientRect().height,
                    error: e.classList.contains('tlnm-error'),
                })),
                images: [...document.images].map(i => i.naturalWidth),
                title: document.title,
            })"""
        )
        screenshot = page.screenshot(full_page=False)
        row = page.locator(".tlnm-row").first.screenshot()
        browser.close()
    return {"state": state, "requests": requests, "problems": problems, "shots": (screenshot, row)}


def test_every_view_mounted(opened):
    views = opened["state"]["views"]
    components = [v["component"] for v in views]
    assert components.count("AttentionPattern") == 30 and components.count("AttentionHeads") == 12
    # value norms per layer, and the "Methods compared" section: methods and ALTI routes
    assert (
        components.count("ColoredTokens") == 12 and components.count("ColoredTokensMulti") == 6 + 2
    )
    for view in views:
        assert not view["error"] and view["children"] > 3 and view["height"] > 20, view


def test_plots_load_and_nothing_reaches_the_network(opened):
    assert opened["state"]["images"] == [opened["state"]["images"][0]] * 3
    assert opened["state"]["images"][0] > 100
    assert all(url.startswith(("file:", "data:")) for url in opened["requests"])
    assert opened["state"]["title"].startswith("tl_normmix report")


def test_no_console_errors(opened):
    assert opened["problems"] == []


@pytest.mark.parametrize("which", [0, 1], ids=["top", "side-by-side"])
def test_screenshot_is_not_blank(opened, which):
    import matplotlib.image
    import numpy as np

    pixels = matplotlib.image.imread(io.BytesIO(opened["shots"][which]), format="png")[..., :3]
    ink = (pixels < 0.9).any(-1).mean()  # share of pixels that are not (near) white
    colours = len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    assert ink > 0.02 and colours > 50, (ink, colours)


def test_a_saved_view_mounts_offline(tmp_path):
    """``view.save(path)`` writes a page that renders on its own, with the network off."""
    from helpers.handmade_maps import handmade
    from playwright.sync_api import sync_playwright

    import tl_normmix as nm

    path = nm.views.compare(handmade(), 0).save(tmp_path / "view.html")
    requests, problems = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        context = browser.new_context(offline=True)

        def route(route):
            requests.append(route.request.url)
            route.continue_() if route.request.url.startswith("file:") else route.abort()

        context.route("**/*", route)
        page = context.new_page()
        page.on("pageerror", lambda err: problems.append(str(err)))
        page.goto(path.as_uri())
        page.wait_for_function(
            "() => [...document.querySelectorAll('.tlnm-view')]"
            ".every(e => e.childElementCount > 0)",
            timeout=60_000,
        )
        mounted = page.evaluate(
            "() => [...document.querySelectorAll('.tlnm-view')].map(e => "
            "[e.classList.contains('tlnm-error'), e.querySelectorAll('*').length])"
        )
        browser.close()
    assert len(mounted) == 3 and all(not error and children > 3 for error, children in mounted)
    assert problems == [] and all(url.startswith("file:") for url in requests)
