"""The run directory: manifest, per-chunk Parquet parts committed by atomic rename, the done-set.

    OUT/manifest.json                     fingerprint and plan (written once)
    OUT/parts/top/chunk-000012.parquet    the chunk's top-k exemplars      (written first)
    OUT/parts/sentences/chunk-000012.parquet  statuses, failures, exemplar texts
    OUT/parts/agg/chunk-000012.parquet    partial sums: THE COMMIT RECORD  (written last)
    OUT/summary/*.parquet                 written by ``reduce``

A chunk is done if and only if its ``agg`` file exists; every file is written to a ``.tmp-*``
name in its folder and renamed (``os.replace``), so a killed run leaves whole files or orphans,
which the next run deletes. A chunk computed twice writes the same names with the same content.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["PARTS", "Store", "Tables"]

PARTS = ("top", "sentences", "agg")  # commit order: agg last


@dataclass
class Tables:
    """One chunk's parts: partial sums (``agg``), top-k exemplars, sentence statuses."""

    agg: pd.DataFrame
    top: pd.DataFrame
    sentences: pd.DataFrame


class Store:
    """Paths and atomic writes of one run directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def part(self, kind: str, chunk: int) -> Path:
        return self.root / "parts" / kind / f"chunk-{chunk:06d}.parquet"

    def summary(self, name: str) -> Path:
        return self.root / "summary" / f"{name}.parquet"

    # -- manifest -------------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            raise FileNotFoundError(
                f"{self.root} is not a corpus run (no manifest.json); start one with "
                "`tl-normmix corpus analyse ... --out DIR`."
            )
        return json.loads(self.manifest_path.read_text())

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._atomic(self.manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())

    # -- parts ----------------------------------------------------------------------------------
    def sweep(self) -> int:
        """Delete orphaned ``.tmp-*`` files of killed runs; returns how many."""
        orphans = list(self.root.glob("**/.tmp-*"))
        for path in orphans:
            path.unlink(missing_ok=True)
        return len(orphans)

    def done(self) -> set[int]:
        folder = self.root / "parts" / "agg"
        if not folder.exists():
            return set()
        return {int(p.stem.split("-")[1]) for p in folder.glob("chunk-*.parquet")}

    def commit(self, chunk: int, tables: Tables) -> None:
        """Write the chunk's parts, ``agg`` last (its existence marks the chunk done)."""
        for kind in PARTS:
            self.write_table(self.part(kind, chunk), getattr(tables, kind))

    def read_part(self, kind: str, chunk: int) -> pd.DataFrame:
        return pd.read_parquet(self.part(kind, chunk))

    def write_table(self, path: Path, frame: pd.DataFrame) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
        frame.to_parquet(tmp, index=False, engine="pyarrow")
        os.replace(tmp, path)

    def _atomic(self, path: Path, data: bytes) -> None:
        tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        os.replace(tmp, path)
