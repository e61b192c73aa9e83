"""One HTML page (or notebook fragment) of CircuitsVis views, plots and text, offline.

CircuitsVis ships its browser bundle in the wheel (``circuitsvis/dist/cdn/iife.js``); its own
``RenderedHTML`` inlines that bundle into *every* view (and probes the internet to choose the CDN
variant in notebooks), and its ``<div .../>`` is not self-closing in HTML, so concatenating two
views loses the second. Here the bundle is inlined once per page as a classic script (it defines
the global ``CircuitsVis``), every view gets its own closed ``<div>`` container and a small script
that renders into it, and nothing refers to the network.

In a notebook the bundle goes into the first view's output of the session only (``"once"``, the
default: a notebook of 20 views carries it once, not 20 times); ``bundle_mode("inline")`` puts it
in every output (each output stands alone) and ``bundle_mode("cdn")`` loads it from unpkg.com
(small outputs, needs the network). Every view waits for the bundle before it renders.
``save`` writes views as one self-contained page.

Ids are random by default (several notebook outputs share one DOM); pass ``new_id`` for fixed ids.
"""

from __future__ import annotations

import html
import importlib.metadata
import importlib.util
import itertools
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args

__all__ = [
    "Block",
    "BundleMode",
    "Row",
    "View",
    "bundle",
    "bundle_mode",
    "fragment",
    "page",
    "save",
    "sequential_ids",
    "write_atomic",
]

#: Where a notebook output finds the CircuitsVis bundle (module docstring).
BundleMode = Literal["once", "inline", "cdn"]


class _Session:
    """The notebook session's bundle setting, and whether an output already carries it."""

    mode: BundleMode = "once"
    sent: bool = False


def bundle_mode(mode: BundleMode | None = None) -> BundleMode:
    """Set (and return) where notebook outputs get the CircuitsVis bundle: ``"once"`` (the first
    output of the session carries it), ``"inline"`` (every output) or ``"cdn"`` (unpkg.com).
    Setting ``"once"`` again puts the bundle into the next output (e.g. after clearing the
    outputs that held it)."""
    if mode is not None:
        if mode not in get_args(BundleMode):
            raise ValueError(f"bundle mode {mode!r}: choose from {', '.join(get_args(BundleMode))}")
        _Session.mode, _Session.sent = mode, False
    return _Session.mode


def _notebook_script() -> str:
    """The bundle's ``<script>`` for the next notebook output, as the mode says."""
    if _Session.mode == "cdn":
        url = f"https://unpkg.com/circuitsvis@{circuitsvis_version()}/dist/cdn/iife.js"
        return f'<script src="{url}"></script>'
    if _Session.mode == "once" and _Session.sent:
        return ""
    _Session.sent = True
    return f"<script>{bundle()}</script>"


@dataclass(frozen=True)
class View:
    """One CircuitsVis component (``AttentionHeads``, ``ColoredTokens``, ...) and its props."""

    component: str
    props: dict[str, Any]
    title: str = ""
    caption: str = ""

    def _repr_html_(self) -> str:
        return _notebook_fragment([self])

    def save(self, path: str | os.PathLike[str], title: str = "") -> Path:
        """Write this view as one self-contained HTML page (works offline); returns the path."""
        return save([self], path, title=title or self.title or self.component)


@dataclass(frozen=True)
class Row:
    """Views side by side (wrapping on narrow screens)."""

    views: tuple[View, ...]
    title: str = ""
    caption: str = ""

    def _repr_html_(self) -> str:
        return _notebook_fragment([self])

    def save(self, path: str | os.PathLike[str], title: str = "") -> Path:
        """Write these views as one self-contained HTML page (works offline)."""
        return save([self], path, title=title or self.title or "tl_normmix views")


@dataclass(frozen=True)
class Block:
    """Trusted HTML (a plot as an ``<img>``, a table) placed as it is."""

    html: str
    title: str = ""
    caption: str = ""
    classes: tuple[str, ...] = field(default=())


Item = View | Row | Block


@cache
def bundle() -> str:
    """The CircuitsVis browser bundle, ready to inline in a ``<script>`` element."""
    spec = importlib.util.find_spec("circuitsvis")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "Rendering needs the package 'circuitsvis' (its bundle): pip install circuitsvis"
        )
    path = Path(spec.origin).parent / "dist" / "cdn" / "iife.js"
    if not path.exists():
        raise FileNotFoundError(f"circuitsvis is installed but its bundle {path} is missing.")
    source = path.read_text(encoding="utf-8")
    # No source-map fetch; "</script" may only appear inside string literals, where "<\/" is "</".
    source = "\n".join(
        line for line in source.splitlines() if not line.startswith("//# sourceMappingURL=")
    )
    return source.replace("</script", "<\\/script").replace("<!--", "<\\!--")


def circuitsvis_version() -> str:
    return importlib.metadata.version("circuitsvis")


def sequential_ids(prefix: str = "tlnm") -> Callable[[], str]:
    """Fixed ids ``prefix-0``, ``prefix-1``, ... (snapshots, tests)."""
    counter: Iterator[int] = itertools.count()
    return lambda: f"{prefix}-{next(counter)}"


def _random_id() -> str:
    return f"tlnm-{uuid.uuid4().hex[:12]}"


def script_json(value: Any) -> str:
    """``value`` as JSON that is safe inside a ``<script>`` element."""
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_STYLE = """
.tlnm { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; }
.tlnm h1 { font-size: 1.5em; margin: 0.3em 0; }
.tlnm h2 { font-size: 1.25em; margin: 1.2em 0 0.3em; border-bottom: 1px solid #ddd; }
.tlnm h3 { font-size: 1.05em; margin: 0.8em 0 0.2em; }
.tlnm .tlnm-caption { color: #555; font-size: 0.9em; margin: 0.2em 0 0.5em; }
.tlnm .tlnm-row { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.tlnm .tlnm-cell { min-width: 260px; }
.tlnm .tlnm-row > .tlnm-cell { flex: 0 0 340px; width: 340px; min-width: 0; }
.tlnm .tlnm-view { margin: 8px 0; }
.tlnm table { border-collapse: collapse; font-size: 0.9em; }
.tlnm td, .tlnm th { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
.tlnm th { background: #f5f5f5; }
.tlnm .tlnm-error { color: #b00; white-space: pre-wrap; }
.tlnm img { max-width: 100%; }
"""


def _heading(level: int, title: str, caption: str) -> str:
    out = f"<h{level}>{html.escape(title)}</h{level}>" if title else ""
    if caption:
        out += f'<div class="tlnm-caption">{html.escape(caption)}</div>'
    return out


def _view(view: View, new_id: Callable[[], str], level: int) -> str:
    element = new_id()
    component = view.component
    # waits for the bundle (a notebook's first output, or the CDN), then renders
    render = (
        "<script>(function () {"
        f'var el = document.getElementById("{element}"), tries = 0;'
        "function fail(text) { el.className += ' tlnm-error'; el.textContent = text; }"
        "function go() {"
        "if (typeof CircuitsVis === 'undefined') {"
        "if (tries++ < 200) { setTimeout(go, 50); return; }"
        'fail(\'CircuitsVis is not loaded here: run nm.views.bundle_mode("inline") and '
        "show the view again'); return; }"
        f"try {{ CircuitsVis.render(el.id, CircuitsVis.{component}, {script_json(view.props)}); }}"
        " catch (err) { fail(String(err)); console.error(err); } }"
        "go();"
        "})();</script>"
    )
    return (
        f'<div class="tlnm-cell">{_heading(level, view.title, view.caption)}'
        f'<div class="tlnm-view" id="{element}" data-component="{component}"></div>'
        f"{render}</div>"
    )


def _item(item: Item, new_id: Callable[[], str], level: int) -> str:
    if isinstance(item, View):
        return _view(item, new_id, level)
    if isinstance(item, Row):
        cells = "".join(_view(v, new_id, level + 1) for v in item.views)
        return (
            f'<section class="tlnm-section">{_heading(level, item.title, item.caption)}'
            f'<div class="tlnm-row">{cells}</div></section>'
        )
    classes = " ".join(("tlnm-block", *item.classes))
    return (
        f'<section class="{classes}">{_heading(level, item.title, item.caption)}'
        f"{item.html}</section>"
    )


def _body(items: Iterable[Item], new_id: Callable[[], str], level: int) -> str:
    return "\n".join(_item(item, new_id, level) for item in items)


def fragment(
    items: Iterable[Item], *, new_id: Callable[[], str] | None = None, inline_bundle: bool = True
) -> str:
    """HTML for a notebook output: the bundle (``inline_bundle``), then every item in its own
    container."""
    script = f"<script>{bundle()}</script>" if inline_bundle else ""
    return _fragment(items, script, new_id)


def _fragment(items: Iterable[Item], script: str, new_id: Callable[[], str] | None) -> str:
    body = _body(items, new_id or _random_id, level=3)
    return f'<div class="tlnm"><style>{_STYLE}</style>{script}\n{body}</div>'


def _notebook_fragment(items: Iterable[Item]) -> str:
    """A notebook output: the bundle as the session's mode says (``bundle_mode``)."""
    return _fragment(items, _notebook_script(), None)


def save(items: Iterable[Item], path: str | os.PathLike[str], *, title: str = "") -> Path:
    """Write views, rows and blocks as one self-contained HTML page (the bundle inlined once;
    it works offline). The file appears complete or not at all; returns its path."""
    target = Path(path).expanduser()
    write_atomic(target, page(list(items), title=title or "tl_normmix views"))
    return target


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that the file appears complete or not at all."""
    folder = path.parent if str(path.parent) else Path(".")
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def page(
    items: Iterable[Item],
    *,
    title: str,
    header: str = "",
    new_id: Callable[[], str] | None = None,
    inline_bundle: bool = True,
) -> str:
    """A whole self-contained HTML document (``header`` is trusted HTML placed under the title).

    ``inline_bundle=False`` leaves the bundle out (snapshots of the page's own markup only).
    """
    script = f"<script>/* CircuitsVis {circuitsvis_version()} */\n{bundle()}</script>"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        f'<body class="tlnm">\n<h1>{html.escape(title)}</h1>\n{header}\n'
        f"{script if inline_bundle else ''}\n"
        f"{_body(items, new_id or _random_id, level=2)}\n</body>\n</html>\n"
    )
