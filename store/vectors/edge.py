"""The embedded vector index: the Qdrant engine in-process (qdrant-edge-py) with HNSW; the embedded default."""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from pathlib import Path

import numpy as np
import qdrant_edge as qe

from store.diskspace import DiskReserve
from store.vectors.interface import (
    INDEXED_PAYLOAD_KEYS,
    FilterTerm,
    SearchHit,
    SearchRequest,
    VectorIndex,
    check_stored_dimension,
    safe_version_name,
    search_hit,
)

EDGE_META_FILE = "omniattr_vectors.json"
EDGE_PARTITION_PREFIX = "attribute-"
# Disk bytes per point besides its vector (id tracker, versions, payload and its index), for the free-space check;
# generous, since the reserve rather than this estimate is the margin.
POINT_OVERHEAD_BYTES = 1024


class QdrantEdgeIndex(VectorIndex):
    """The embedded vector index: Qdrant Edge shards under `data_dir`, one per (encoder version, attribute).

    Layout: `data_dir/<safe version>/omniattr_vectors.json` records the encoder version and dimension (written
    last, so a version directory without it never finished its creation), and `attribute-<id>/` beside it is
    the shard of that attribute's points, created on its first upsert (built in a temporary directory and
    renamed into place). One process at a time may open a `data_dir`.

    Why a shard per attribute: every search is within one attribute, and a shard that holds only it needs no
    attribute filter; at 100k points (10 attributes x 10k images, 256-d) search p95 fell from 5.7 ms (one
    shard per version, attribute filter through the payload index) to 2.7 ms (bench/RESULTS.md). Fetch,
    delete and count across attributes visit every shard of the version (a handful per collection).

    When HNSW is built: Qdrant Edge has no background optimiser, so new points sit in an unindexed
    (brute-force) segment until `optimize()` runs, which blocks while it builds the graph. Unindexed points
    are still found exactly, so a small unindexed tail costs little. We therefore optimise (1) automatically
    at the end of an `upsert` once a shard has `auto_optimize_points` or more unindexed points, which bounds
    the brute-force tail, and (2) when the caller asks, e.g. the indexer at the end of a job.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        hnsw_ef: int = 128,
        hnsw_m: int = 16,
        hnsw_ef_construct: int = 100,
        full_scan_threshold_kb: int = 20_000,
        indexing_threshold_kb: int = 1_000,
        auto_optimize_points: int = 20_000,
        reserve_bytes: int = 0,
    ):
        self.data_dir = Path(data_dir)
        # Checked before every upsert and HNSW build: the segments are memory-mapped, and a write into one on a
        # full disk kills the process with SIGBUS instead of raising.
        self.disk = DiskReserve(self.data_dir, reserve_bytes, "the vector index")
        self.hnsw_ef = hnsw_ef
        self.hnsw_m = hnsw_m
        self.hnsw_ef_construct = hnsw_ef_construct
        # Filtered searches whose matching vectors take less than this many KB are exact scans through
        # the payload index instead of filtered HNSW walks. Qdrant's default is 10 MB; we use 20 MB (20k
        # vectors of 256 floats) because bench/vector_search.py measured filtered HNSW at 2-10 % selectivity
        # slower and less accurate than the exact scan on the same 2 cores.
        self.full_scan_threshold_kb = full_scan_threshold_kb
        # optimize() builds HNSW only for segments larger than this.
        self.indexing_threshold_kb = indexing_threshold_kb
        self.auto_optimize_points = auto_optimize_points
        self._dimensions: dict[str, int] = {}
        self._shards: dict[tuple[str, int], qe.EdgeShard] = {}
        # Per version, the attribute ids that have a shard directory: listed from disk once, then kept up to
        # date by `_partition(create=True)` (this process owns `data_dir`, and shards are never removed), so
        # a fetch does not list the directory on every call.
        self._attribute_ids: dict[str, list[int]] = {}
        self._lock = threading.Lock()  # guards opening and creating shards
        self._closed = False
        # Whether any shard was written since opening: `close` flushes only then (a flush costs ~0.1 s even
        # with nothing to write, a tenth of a CLI search by id).
        self._written = False

    def _version_dir(self, encoder_version: str) -> Path:
        return self.data_dir / safe_version_name(encoder_version)

    def _config(self, dimension: int) -> qe.EdgeConfig:
        return qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=dimension, distance=qe.Distance.Cosine),
            hnsw_config=qe.HnswIndexConfig(
                m=self.hnsw_m, ef_construct=self.hnsw_ef_construct, full_scan_threshold=self.full_scan_threshold_kb
            ),
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=self.indexing_threshold_kb),
        )

    @staticmethod
    def _read_meta(version_dir: Path) -> dict | None:
        try:
            return json.loads((version_dir / EDGE_META_FILE).read_text())
        except FileNotFoundError:
            return None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this QdrantEdgeIndex is closed; open a new one on the same data_dir")

    def _dimension_or_none(self, encoder_version: str) -> int | None:
        """The version's dimension, or None if it has no finished creation."""
        self._check_open()
        dimension = self._dimensions.get(encoder_version)
        if dimension is None:
            meta = self._read_meta(self._version_dir(encoder_version))
            if meta is None:
                return None
            dimension = self._dimensions[encoder_version] = int(meta["dimension"])
        return dimension

    def _partition(self, encoder_version: str, attribute_id: int, *, create: bool = False) -> qe.EdgeShard | None:
        """The open shard of one attribute (created if asked), or None if it has no points yet."""
        key = (encoder_version, attribute_id)
        shard = self._shards.get(key)
        if shard is not None:
            return shard
        dimension = self._dimension(encoder_version)
        with self._lock:
            self._check_open()
            shard = self._shards.get(key)
            if shard is not None:
                return shard
            shard_dir = self._version_dir(encoder_version) / f"{EDGE_PARTITION_PREFIX}{attribute_id}"
            if not shard_dir.is_dir():
                if not create:
                    return None
                self._create_partition(shard_dir, dimension)
                if encoder_version in self._attribute_ids:
                    self._attribute_ids[encoder_version] = sorted({*self._attribute_ids[encoder_version], attribute_id})
            # Passing the config applies this index's HNSW and optimiser settings to an existing shard.
            shard = self._shards[key] = qe.EdgeShard.load(str(shard_dir), self._config(dimension))
            return shard

    def _create_partition(self, shard_dir: Path, dimension: int) -> None:
        temporary = shard_dir.with_name(shard_dir.name + ".creating")
        shutil.rmtree(temporary, ignore_errors=True)  # left by a creation that stopped half way
        shard = qe.EdgeShard.create(str(temporary), self._config(dimension))
        for key in INDEXED_PAYLOAD_KEYS:
            shard.update(qe.UpdateOperation.create_field_index(key, qe.PayloadSchemaType.Integer))
        shard.flush()
        shard.close()
        os.replace(temporary, shard_dir)

    def _partitions(self, encoder_version: str) -> list[qe.EdgeShard]:
        """Every attribute shard of a version, opened."""
        attribute_ids = self._attribute_ids.get(encoder_version)
        if attribute_ids is None:
            with self._lock:
                version_dir = self._version_dir(encoder_version)
                attribute_ids = self._attribute_ids[encoder_version] = sorted(
                    int(path.name.removeprefix(EDGE_PARTITION_PREFIX))
                    for path in version_dir.glob(f"{EDGE_PARTITION_PREFIX}*")
                    if path.is_dir() and path.name.removeprefix(EDGE_PARTITION_PREFIX).isdigit()
                )
        return [self._partition(encoder_version, attribute_id) for attribute_id in attribute_ids]

    def _ensure_collection(self, encoder_version: str, dimension: int) -> None:
        """Record the version and its dimension if needed; shards are created by their first upsert."""
        existing = self._dimension_or_none(encoder_version)
        if existing is None:
            with self._lock:
                version_dir = self._version_dir(encoder_version)
                if self._read_meta(version_dir) is None:
                    version_dir.mkdir(parents=True, exist_ok=True)
                    meta = {
                        "encoder_version": encoder_version,
                        "dimension": dimension,
                        "distance": "cosine",
                        "layout": "shard per attribute",
                    }
                    temporary = version_dir / (EDGE_META_FILE + ".tmp")
                    temporary.write_text(json.dumps(meta))
                    os.replace(temporary, version_dir / EDGE_META_FILE)
            existing = self._dimension(encoder_version)
        check_stored_dimension(encoder_version, stored=existing, wanted=dimension)

    def _write(
        self, encoder_version: str, ids: list[uuid.UUID], vectors: np.ndarray, payloads: list[dict], *, batch_size: int
    ) -> None:
        """Write points in batches, each attribute's into its shard; builds HNSW past `auto_optimize_points`."""
        by_attribute: dict[int, list[int]] = {}
        for index, payload in enumerate(payloads):
            by_attribute.setdefault(payload["attribute_id"], []).append(index)
        # What the write may take: the vectors twice (write-ahead log and segment) and per-point bookkeeping.
        self.disk.ensure_free(2 * vectors.nbytes + POINT_OVERHEAD_BYTES * len(ids))
        self._written = True
        for attribute_id, indices in by_attribute.items():
            shard = self._partition(encoder_version, attribute_id, create=True)
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                # Python lists convert about twice as fast as numpy rows (which go element by element).
                rows = vectors[chunk].tolist()
                batch = [qe.Point(ids[i], row, payloads[i]) for i, row in zip(chunk, rows, strict=True)]
                shard.update(qe.UpdateOperation.upsert_points(batch))
            info = shard.info()
            if info.points_count - info.indexed_vectors_count >= self.auto_optimize_points:
                self._optimize_shard(shard, vectors.shape[1])

    def _optimize_shard(self, shard: qe.EdgeShard, dimension: int) -> None:
        # The new segment holds every point again: its vector, its HNSW links (2m at level 0) and bookkeeping.
        self.disk.ensure_free(shard.info().points_count * (4 * dimension + 8 * self.hnsw_m + POINT_OVERHEAD_BYTES))
        shard.optimize()
        shard.flush()

    def optimize(self, *, encoder_version: str) -> None:
        """Build HNSW for every point written so far (blocking: tens of seconds per 10k points on 2 cores)."""
        dimension = self._dimension(encoder_version)
        for shard in self._partitions(encoder_version):
            self._optimize_shard(shard, dimension)

    def indexed_vectors_count(self, *, encoder_version: str) -> int:
        """How many vectors are in HNSW-indexed segments (the rest are searched by brute force)."""
        self._dimension(encoder_version)
        return sum(shard.info().indexed_vectors_count for shard in self._partitions(encoder_version))

    @staticmethod
    def _filter(terms: list[FilterTerm], excluded_image_ids: list[int]) -> qe.Filter | None:
        must = [
            qe.FieldCondition(key=key, match=qe.MatchAny(value) if isinstance(value, list) else qe.MatchValue(value))
            for key, value in terms
        ]
        must_not = []
        if excluded_image_ids:
            must_not.append(qe.FieldCondition(key="image_id", match=qe.MatchAny(excluded_image_ids)))
        if not must and not must_not:
            return None
        return qe.Filter(must=must or None, must_not=must_not or None)

    def _search(self, encoder_version: str, request: SearchRequest) -> list[SearchHit]:
        """Top-k in the attribute's shard: it holds that attribute only, so no attribute condition (a scan)."""
        shard = self._partition(encoder_version, request.attribute_id)
        if shard is None:  # nothing indexed under this attribute yet
            return []
        query = qe.QueryRequest(
            limit=request.limit,
            query=qe.Query.Nearest(request.query.tolist()),
            filter=self._filter(request.terms, request.excluded_image_ids),
            params=qe.SearchParams(hnsw_ef=self.hnsw_ef, exact=request.exact),
            with_payload=True,
        )
        return [search_hit(point.id, point.score, point.payload) for point in shard.query(query)]

    def _fetch(self, encoder_version: str, ids: list[uuid.UUID]) -> dict[str, np.ndarray]:
        """Look in every attribute shard until each id is found."""
        found: dict[str, np.ndarray] = {}
        for shard in self._partitions(encoder_version):
            missing = [id_ for id_ in ids if str(id_) not in found]
            if not missing:
                break
            for record in shard.retrieve(missing, with_payload=False, with_vector=True):
                found[str(record.id)] = np.asarray(record.vector, dtype=np.float32)
        return found

    def _fetch_payloads(self, encoder_version: str, ids: list[uuid.UUID]) -> dict[str, dict]:
        """Look in every attribute shard until each id is found."""
        found: dict[str, dict] = {}
        for shard in self._partitions(encoder_version):
            missing = [id_ for id_ in ids if str(id_) not in found]
            if not missing:
                break
            for record in shard.retrieve(missing, with_payload=True, with_vector=False):
                found[str(record.id)] = dict(record.payload)
        return found

    def _delete_where(self, encoder_version: str, terms: list[FilterTerm]) -> None:
        self._written = True
        for shard in self._partitions(encoder_version):
            shard.update(qe.UpdateOperation.delete_points_by_filter(self._filter(terms, [])))

    def _count(self, encoder_version: str, *, terms: list[FilterTerm], attribute_id: int | None) -> int:
        request = qe.CountRequest(exact=True, filter=self._filter(terms, []))
        if attribute_id is not None:
            shard = self._partition(encoder_version, attribute_id)
            return shard.count(request) if shard is not None else 0
        return sum(shard.count(request) for shard in self._partitions(encoder_version))

    def list_encoder_versions(self) -> list[str]:
        """Versions with a finished creation under `data_dir`."""
        if not self.data_dir.is_dir():
            return []
        versions = []
        for version_dir in self.data_dir.iterdir():
            meta = self._read_meta(version_dir) if version_dir.is_dir() else None
            if meta is not None:
                versions.append(meta["encoder_version"])
        return sorted(versions)

    def close(self) -> None:
        """Flush (if anything was written) and close every open shard."""
        with self._lock:
            for shard in self._shards.values():
                if self._written:
                    shard.flush()
                shard.close()
            self._shards.clear()
            self._attribute_ids.clear()
            self._dimensions.clear()
            self._closed = True
