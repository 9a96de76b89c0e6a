"""The vector index: one Qdrant collection per encoder version, on a Qdrant server or embedded Qdrant Edge.

- `interface`: `VectorIndex` (the one interface; it checks every argument for both backends), `VectorPoint`,
  `SearchHit`, the deterministic `point_id` and the encoding of encoder versions into names.
- `server`: `QdrantServerIndex`, a Qdrant server through qdrant-client.
- `edge`: `QdrantEdgeIndex`, the Qdrant engine in-process (qdrant-edge-py) with HNSW; the embedded default.

`open_vector_index` opens the one an entry point's settings describe.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from store.errors import InvalidInputError
from store.vectors.edge import QdrantEdgeIndex
from store.vectors.interface import (
    PayloadFilter,
    SearchHit,
    VectorIndex,
    VectorPoint,
    point_id,
    safe_version_name,
    version_from_safe_name,
)

if TYPE_CHECKING:
    from store.vectors.server import QdrantServerIndex

__all__ = [
    "PayloadFilter",
    "QdrantEdgeIndex",
    "QdrantServerIndex",
    "SearchHit",
    "VectorIndex",
    "VectorPoint",
    "open_vector_index",
    "point_id",
    "safe_version_name",
    "version_from_safe_name",
]


def __getattr__(name: str) -> object:
    # Lazy (PEP 562): qdrant-client takes seconds to import, and the embedded profile never uses it.
    if name == "QdrantServerIndex":
        from store.vectors.server import QdrantServerIndex

        return QdrantServerIndex
    raise AttributeError(f"module 'store.vectors' has no attribute {name!r}")


def open_vector_index(
    *,
    kind: Literal["server", "embedded"],
    url: str | None = None,
    data_dir: Path | None = None,
    api_key: str | None = None,
    reserve_bytes: int = 0,
) -> VectorIndex:
    """Open the vector index an entry point's settings describe; embedded, writes keep `reserve_bytes` free on
    the disk of `data_dir` (a server keeps its own disk)."""
    if kind == "server":
        if url is None:
            raise InvalidInputError("a server vector index needs the Qdrant url, e.g. http://qdrant:6333")
        from qdrant_client import QdrantClient

        from store.vectors.server import QdrantServerIndex

        return QdrantServerIndex(QdrantClient(url=url, api_key=api_key))
    if kind == "embedded":
        if data_dir is None:
            raise InvalidInputError("an embedded vector index needs data_dir, the folder for its shards")
        return QdrantEdgeIndex(Path(data_dir), reserve_bytes=reserve_bytes)
    raise InvalidInputError(f"unknown vector index kind {kind!r}; use 'server' or 'embedded'")
