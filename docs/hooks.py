"""Build-time hooks of the docs: pages generated from the code so that they cannot drift.

* ``<!-- scopes-table -->``: the registry (``nm.list_scopes()``), one row per scope;
* ``<!-- cli-reference -->``: the command line's help, from its parser;
* ``<!-- version -->``: the installed package's version.
"""

from __future__ import annotations

import argparse
import io
from contextlib import redirect_stdout
from typing import Any


def _scopes_table() -> str:
    import tl_normmix as nm
    from tl_normmix.maps.method import LAYOUTS

    layouts = list(LAYOUTS)
    head = "| scope | what it measures | per head | options | " + " | ".join(
        f"`{name}`" for name in layouts
    )
    rule = "|---|---|---|---|" + "---|" * len(layouts)
    rows = [head + " |", rule]
    for m in nm.list_scopes():
        where = m.layouts()
        cells = [
            "via `" + m.computed_by.split("(")[0] + "`"
            if m.kernel is None
            else ("✓" if where[name] is None else "–")
            for name in layouts
        ]
        options = f"`{m.options.__name__}`" if m.options is not None else ""
        docs = m.docs.replace("methods.md", "../methods.md")
        rows.append(
            f"| [`{m.name}`]({docs}) | {m.description} | {'yes' if m.has_heads else ''} | "
            f"{options} | " + " | ".join(cells) + " |"
        )
    reasons = sorted(
        {
            (m.name, name, reason)
            for m in nm.list_scopes()
            if m.kernel is not None
            for name, reason in m.layouts().items()
            if reason is not None
        }
    )
    notes = ["", "Why a scope is refused (the error says the same):", ""]
    seen: dict[str, list[str]] = {}
    for scope, layout, reason in reasons:
        seen.setdefault(f"`{scope}`: {reason}", []).append(f"`{layout}`")
    notes += [f"- {text} ({', '.join(where)})" for text, where in seen.items()]
    return "\n".join(rows + notes)


def _parser_help(parser: argparse.ArgumentParser, prog: str, level: int) -> list[str]:
    out = [f"{'#' * level} `{prog}`", "", "```text"]
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        parser.print_help()
    out += [buffer.getvalue().rstrip(), "```", ""]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _parser_help(sub, f"{prog} {name}", min(level + 1, 4))
    return out


def _cli_reference() -> str:
    from tl_normmix.cli import parser

    return "\n".join(_parser_help(parser(), "tl-normmix", 2))


def _version() -> str:
    import tl_normmix

    return tl_normmix.__version__


GENERATED = {
    "<!-- scopes-table -->": _scopes_table,
    "<!-- cli-reference -->": _cli_reference,
    "<!-- version -->": _version,
}


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    for marker, make in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown
