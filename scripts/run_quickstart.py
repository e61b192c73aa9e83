"""Run the README's quickstart as a user would, from an installed tl_normmix (not the source
tree): extract the first ```python block after "## Quickstart", execute it, and check that its
last line is a view that renders (the CircuitsVis bundle inlined, every view in its container).

    .venv-wheel/bin/python scripts/run_quickstart.py README.md
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def quickstart(readme: Path) -> str:
    text = readme.read_text(encoding="utf-8")
    section = text[text.index("## Quickstart") :]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    if match is None:
        raise SystemExit("no ```python block under ## Quickstart")
    return match.group(1)


def main() -> None:
    readme = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    code = quickstart(readme)
    *body, last = [line for line in code.strip().splitlines() if line.strip()]
    namespace: dict[str, object] = {}
    exec(compile("\n".join(body), "README quickstart", "exec"), namespace)
    view = eval(compile(last.split("#")[0].strip(), "README quickstart", "eval"), namespace)
    html = view._repr_html_()  # type: ignore[attr-defined]
    assert "var CircuitsVis" in html and 'class="tlnm-view"' in html, "the view did not render"
    import tl_normmix

    location = Path(tl_normmix.__file__).resolve()
    assert "site-packages" in location.parts, f"tl_normmix imported from {location}, not a wheel"
    print(f"README quickstart ran with tl_normmix {tl_normmix.__version__} from {location.parent}")


if __name__ == "__main__":
    main()
