"""The free-space reserve every write to the data directory keeps (media files, vector shards, SQLite commits).

A full disk under Qdrant Edge's memory-mapped segments killed the embedded server with SIGBUS (issue 16), and
a full disk under SQLite fails its commits; checking before a write turns both into a clear refusal (HTTP 507,
or a failed shard with this message) while there is still room for the process to carry on.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from store.errors import InsufficientStorageError


@dataclass(frozen=True)
class DiskReserve:
    """At least `reserve_bytes` stay free on the disk that holds `path` (`what` names it in the message)."""

    path: Path
    reserve_bytes: int
    what: str

    def free_bytes(self) -> int:
        """Free bytes on the disk of `path` (of its nearest existing parent before it is created)."""
        existing = next(p for p in (self.path, *self.path.parents) if p.exists())
        return shutil.disk_usage(existing).free

    def ensure_free(self, nbytes: int = 0) -> None:
        """InsufficientStorageError unless `nbytes` can be written and leave the reserve free."""
        free = self.free_bytes()
        if free - nbytes < self.reserve_bytes:
            raise InsufficientStorageError(self.message(free))

    def message(self, free: int | None = None) -> str:
        """What to tell the user when this disk is (nearly) full."""
        free = self.free_bytes() if free is None else free
        return (
            f"not enough disk space for {self.what} {self.path}: {free / 2**20:.1f} MiB free, "
            f"{self.reserve_bytes / 2**20:.0f} MiB kept in reserve (OMNIATTR_DISK_RESERVE_MB). Free space on that "
            "disk (delete collections or images you no longer need, or other files), or move OMNIATTR_DATA_DIR to a "
            "larger disk, then try again."
        )
