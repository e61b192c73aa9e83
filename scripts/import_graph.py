"""The package's import graph by room (a top-level module or folder): modules per room, the
arrows between rooms, and the arrows that run back up the intended order of floors.

    .venv/bin/python scripts/import_graph.py                # this checkout's tl_normmix
    .venv/bin/python scripts/import_graph.py --root PATH --package NAME   # another copy

Every ``import`` and ``from ... import`` of the package counts, lazy ones inside functions too.
"""

from __future__ import annotations

import argparse
import ast
from collections import Counter, defaultdict
from pathlib import Path

#: The intended floors, bottom first: a room may import rooms on its own floor or below.
FLOORS = [
    ("decompose", "memory"),
    ("models",),
    ("maps",),
    ("aggregate", "analysis"),
    ("interventions", "corpus"),
    ("render",),
    ("reports",),
    ("cli", "__init__"),
]


def room_of(module: str, package: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph(root: Path, package: str) -> tuple[Counter[str], Counter[tuple[str, str]]]:
    modules: Counter[str] = Counter()
    arrows: Counter[tuple[str, str]] = Counter()
    for path in sorted((root / package).rglob("*.py")):
        relative = path.relative_to(root).with_suffix("")
        name = ".".join(relative.parts).removesuffix(".__init__")
        source = room_of(name, package)
        modules[source] += 1
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == package:
                    targets = [f"{package}.{alias.name}" for alias in node.names]
                elif node.module.startswith(package + "."):
                    targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith(package + ".")]
            for target in targets:
                room = room_of(target, package)
                if room != source:
                    arrows[(source, room)] += 1
    return modules, arrows


def floor(room: str, rooms: dict[str, str]) -> int:
    name = rooms.get(room, room)
    for level, names in enumerate(FLOORS):
        if name in names:
            return level
    return -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--package", default="tl_normmix")
    parser.add_argument(
        "--room-floor",
        nargs="*",
        default=[],
        help="ROOM=FLOOR_ROOM pairs placing rooms that FLOORS does not name (an older layout)",
    )
    args = parser.parse_args()
    rooms = dict(pair.split("=", 1) for pair in args.room_floor)
    modules, arrows = graph(args.root, args.package)
    print(f"{len(modules)} rooms, {sum(modules.values())} modules, {len(arrows)} arrows")
    for room, count in sorted(modules.items(), key=lambda kv: (floor(kv[0], rooms), kv[0])):
        print(f"  floor {floor(room, rooms):>2}  {room:<16} {count:>3} modules")
    up = [(a, b, n) for (a, b), n in arrows.items() if floor(a, rooms) < floor(b, rooms)]
    print(f"arrows running back up: {len(up)}")
    for a, b, n in sorted(up):
        print(f"  {a} -> {b} ({n} imports)")
    outgoing: defaultdict[str, list[str]] = defaultdict(list)
    for a, b in arrows:
        outgoing[a].append(b)
    for a in sorted(outgoing, key=lambda r: floor(r, rooms)):
        print(f"  {a} -> {', '.join(sorted(outgoing[a]))}")


if __name__ == "__main__":
    main()
