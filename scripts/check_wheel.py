"""Check a built wheel: the package and its ``py.typed`` are in it, the tests are not, the licence
and the metadata (version, classifiers, keywords) are.

    .venv/bin/python scripts/check_wheel.py dist/tl_normmix-*.whl
"""

from __future__ import annotations

import sys
import zipfile
from email.parser import Parser


def main() -> None:
    path = sys.argv[1]
    with zipfile.ZipFile(path) as wheel:
        names = wheel.namelist()
        metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(wheel.read(metadata_name).decode())
    packages = sorted({n.split("/")[0] for n in names})
    problems = []
    if any(n.startswith(("tests/", "scripts/", "docs/")) for n in names):
        problems.append("tests, scripts or docs inside the wheel")
    if "tl_normmix/py.typed" not in names:
        problems.append("no tl_normmix/py.typed")
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        problems.append("no LICENSE")
    for field in ("Version", "Summary", "Keywords", "Classifier", "License-Expression"):
        if not metadata.get_all(field):
            problems.append(f"no {field} in the metadata")
    modules = sum(n.endswith(".py") for n in names)
    print(
        f"{path}: {len(names)} files, {modules} modules, top level {packages}; "
        f"version {metadata['Version']}, {len(metadata.get_all('Classifier') or [])} classifiers"
    )
    if problems:
        raise SystemExit("; ".join(problems))


if __name__ == "__main__":
    main()
