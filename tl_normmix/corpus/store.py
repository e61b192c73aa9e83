"""The run directory: manifest, per-chunk Parquet parts committed by atomic rename, the done-set.

    OUT/manifest.json                     fingerprint and plan (created once)
    OUT/parts/top/chunk-000012.parquet    the chunk's top-k exemplars      (written first)
    OUT/parts/sentences/chunk-000012.parquet  statuses, failures, exemplar texts
    OUT/parts/agg/chunk-000012.parquet    partial sums: THE COMMIT RECORD  (written last)
    OUT/parts/locks/chunk-000012.lock     held while the chunk is committed
    OUT/parts/commits.log                 one line per commit: chunk, host, process, time
    OUT/summary/*.parquet                 written by ``reduce``

A chunk is done if and only if its ``agg`` file exists. Several processes may work on one run at
once (shards started together, a shard given twice, ``reduce`` while shards run), so:

* every file is written to a temporary name owned by its writer (``.tmp-HOST-PID-…``) and renamed
  (``os.replace``) into place; ``sweep`` deletes only temporary files whose owner is gone (a
  process of this host that no longer runs; on another host, a file untouched for an hour);
* the manifest is created once, atomically (a hard link that fails if it exists), and a process
  that finds one checks its fingerprint instead;
* a chunk is committed under an exclusive lock of its lock file (``flock``, released by the
  operating system if the process dies), and only if it is not done yet: no chunk is committed
  twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["PARTS", "Store", "Tables"]

PARTS = ("top", "sentences", "agg")  # commit order: agg last

#: A temporary file of another host is an orphan once untouched this long (seconds).
FOREIGN_ORPHAN_AGE = 3600.0

logger = logging.getLogger("tl_normmix")
_HOST = socket.gethostname().replace("-", "_")


@dataclass
class Tables:
    """One chunk's parts: partial sums (``agg``), top-k exemplars, sentence statuses."""

    agg: pd.DataFrame
    top: pd.DataFrame
    sentences: pd.DataFrame


def _temporary(folder: Path) -> Path:
    """A temporary name in ``folder`` owned by this process."""
    return folder / f".tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex}"


def _owner_gone(path: Path, now: float) -> bool:
    """Whether the process that writes the temporary file ``path`` is gone."""
    parts = path.name.split("-")
    try:
        host, pid = parts[1], int(parts[2])
    except (IndexError, ValueError):  # not a name of ours: an orphan once old
        host, pid = "", -1
    if host == _HOST and pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # a live process of another user
            return False
        return False
    try:
        return now - path.stat().st_mtime > FOREIGN_ORPHAN_AGE
    except FileNotFoundError:
        return False


class Store:
    """Paths and atomic, concurrency-safe writes of one run directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def journal_path(self) -> Path:
        return self.root / "parts" / "commits.log"

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

    def create_manifest(self, manifest: dict[str, Any]) -> bool:
        """Create the manifest unless one exists (atomically: one of several processes starting
        together creates it); returns whether this call created it."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(self.root)
        tmp.write_bytes(json.dumps(manifest, indent=1, sort_keys=True).encode())
        try:
            os.link(tmp, self.manifest_path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    # -- parts ----------------------------------------------------------------------------------
    def orphans(self) -> list[Path]:
        """Temporary files whose writer is gone (killed runs)."""
        now = time.time()
        return [p for p in self.root.glob("**/.tmp-*") if _owner_gone(p, now)]

    def sweep(self) -> int:
        """Delete the temporary files of writers that are gone; returns how many."""
        orphans = self.orphans()
        for path in orphans:
            path.unlink(missing_ok=True)
        if orphans:
            logger.info("%s: deleted %d orphaned temporary files", self.root, len(orphans))
        return len(orphans)

    def done(self) -> set[int]:
        folder = self.root / "parts" / "agg"
        if not folder.exists():
            return set()
        return {int(p.stem.split("-")[1]) for p in folder.glob("chunk-*.parquet")}

    def is_done(self, chunk: int) -> bool:
        return self.part("agg", chunk).exists()

    def commit(self, chunk: int, tables: Tables) -> bool:
        """Write the chunk's parts, ``agg`` last (its existence marks the chunk done), under the
        chunk's lock and only if no process committed it before; returns whether it did."""
        with self._locked(chunk):
            if self.is_done(chunk):
                logger.info("%s: chunk %d was committed by another process", self.root, chunk)
                return False
            for kind in PARTS:
                self.write_table(self.part(kind, chunk), getattr(tables, kind))
            self._journal(chunk)
        return True

    def commits(self) -> list[tuple[int, str, int]]:
        """Every commit of the journal: ``(chunk, host, process id)``."""
        if not self.journal_path.exists():
            return []
        out = []
        for line in self.journal_path.read_text().splitlines():
            chunk, host, pid, _ = line.split("\t")
            out.append((int(chunk), host, int(pid)))
        return out

    def read_part(self, kind: str, chunk: int) -> pd.DataFrame:
        return pd.read_parquet(self.part(kind, chunk))

    def write_table(self, path: Path, frame: pd.DataFrame) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(path.parent)
        try:
            frame.to_parquet(tmp, index=False, engine="pyarrow")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _journal(self, chunk: int) -> None:
        line = f"{chunk}\t{_HOST}\t{os.getpid()}\t{time.time():.3f}\n".encode()
        descriptor = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, line)  # one small append: whole lines, whatever runs beside
        finally:
            os.close(descriptor)

    @contextlib.contextmanager
    def _locked(self, chunk: int) -> Iterator[None]:
        """Hold the chunk's exclusive lock (released by the system if the process dies)."""
        folder = self.root / "parts" / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(folder / f"chunk-{chunk:06d}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(descriptor)
            yield
        finally:
            os.close(descriptor)  # closing releases the lock


def _lock(descriptor: int) -> None:
    if sys.platform == "win32":  # lock the file's first byte
        import msvcrt

        msvcrt.locking(descriptor, msvcrt.LK_LOCK, 1)
    else:
        import fcntl

        fcntl.flock(descriptor, fcntl.LOCK_EX)
