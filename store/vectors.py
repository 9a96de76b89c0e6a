"""The vector index: one Qdrant collection per encoder version, on a Qdrant server or embedded Qdrant Edge.

A point is one (image, attribute) embedding. Its id is deterministic (`point_id`), so writing the same
image and attribute again overwrites the point instead of adding a second one. Every payload records the
encoder version, image, attribute and image collection, so vectors of two models are never compared.

Two backends behind one interface (`VectorIndex`):
- `QdrantServerIndex` talks to a Qdrant server through qdrant-client. Tests use qdrant-client's local mode
  (`QdrantClient(location=":memory:")`), which is brute force in Python and ignores payload indexes.
- `QdrantEdgeIndex` runs the Qdrant engine in-process (qdrant-edge-py) with HNSW; the embedded default.
"""

from __future__ import annotations

import abc
import functools
import json
import operator
import os
import shutil
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import qdrant_edge as qe
from qdrant_client import QdrantClient
from qdrant_client import models as qm

from store.errors import ConflictError, DimensionMismatchError, InvalidInputError, NotFoundError

# Fixed forever: changing it would give every stored point a new id.
POINT_ID_NAMESPACE = uuid.UUID("3473e2cc-a543-4889-b57a-01819bf933ac")

# Payload keys the index writes itself; a point's extra payload may not use them.
RESERVED_PAYLOAD_KEYS = ("encoder_version", "image_id", "attribute_id", "collection_id")
# Integer payload fields with a payload index: the filters every search and delete uses.
INDEXED_PAYLOAD_KEYS = ("collection_id", "attribute_id", "image_id")

COLLECTION_PREFIX = "omniattr__"
# The physical collection behind an alias; a new layout (e.g. quantized) would get "__v2" and a re-index.
PHYSICAL_SUFFIX = "__v1"
SAFE_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
# Qdrant limits collection names to 255 characters; keep room for the prefix and suffix.
MAX_SAFE_VERSION_LENGTH = 200

PayloadScalar = str | int | bool
PayloadFilter = Mapping[str, PayloadScalar | Sequence[str] | Sequence[int]]


@dataclass(slots=True)
class VectorPoint:
    """One (image, attribute) embedding to write."""

    image_id: int
    attribute_id: int
    collection_id: int
    vector: np.ndarray | list[float]  # (D,)
    payload: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One search result; `payload` is the whole stored payload, reserved keys included."""

    point_id: str
    image_id: int
    attribute_id: int
    collection_id: int
    score: float
    payload: dict


def point_id(*, image_id: int, attribute_id: int, encoder_version: str) -> uuid.UUID:
    """The deterministic id of the point for one image, attribute and encoder version."""
    return uuid.uuid5(POINT_ID_NAMESPACE, f"{image_id}:{attribute_id}:{encoder_version}")


@functools.lru_cache(maxsize=1024)
def safe_version_name(encoder_version: str) -> str:
    """Encode an encoder version for collection and directory names: [a-z0-9-] kept, other bytes as _xx.

    The encoding is reversible (`version_from_safe_name`), so "a.b" and "a_b" never share a collection;
    capitals are escaped too, so "V1" and "v1" never share a directory on a case-insensitive file system.
    """
    if not isinstance(encoder_version, str) or not encoder_version:
        raise InvalidInputError(f"encoder_version must be a non-empty string, got {encoder_version!r}")
    parts = []
    for byte in encoder_version.encode("utf-8"):
        character = chr(byte)
        if character in SAFE_CHARACTERS:
            parts.append(character)
        else:
            parts.append(f"_{byte:02x}")
    safe = "".join(parts)
    if len(safe) > MAX_SAFE_VERSION_LENGTH:
        raise InvalidInputError(
            f"encoder_version {encoder_version!r} is too long for a collection name; "
            f"use a version string of at most about {MAX_SAFE_VERSION_LENGTH // 3} characters"
        )
    return safe


def version_from_safe_name(safe: str) -> str:
    """Decode a name made by `safe_version_name`."""
    data = bytearray()
    position = 0
    while position < len(safe):
        if safe[position] == "_":
            data.append(int(safe[position + 1 : position + 3], 16))
            position += 3
        else:
            data.append(ord(safe[position]))
            position += 1
    return data.decode("utf-8")


class VectorIndex(abc.ABC):
    """Top-k search over (image, attribute) embeddings, one collection per encoder version."""

    @abc.abstractmethod
    def ensure_collection(self, *, encoder_version: str, dimension: int) -> None:
        """Create the collection for an encoder version if needed; ConflictError if its dimension differs."""

    @abc.abstractmethod
    def upsert(self, *, encoder_version: str, points: Sequence[VectorPoint], batch_size: int = 512) -> int:
        """Write points (overwriting same image and attribute) and return how many were written."""

    @abc.abstractmethod
    def search(
        self,
        *,
        encoder_version: str,
        vector: np.ndarray | Sequence[float],
        collection_id: int | None,
        attribute_id: int,
        limit: int = 10,
        exclude_image_ids: Iterable[int] = (),
        payload_filter: PayloadFilter | None = None,
        exact: bool = False,
    ) -> list[SearchHit]:
        """The `limit` points most similar (cosine) to `vector` among one attribute's points, best first."""

    @abc.abstractmethod
    def fetch(self, *, encoder_version: str, point_ids: Iterable[str | uuid.UUID]) -> dict[str, np.ndarray]:
        """Stored vectors by point id (unit length: cosine collections normalise on write); missing ids absent."""

    @abc.abstractmethod
    def delete_images(self, *, encoder_version: str, image_ids: Iterable[int]) -> None:
        """Delete every point of these images; a version that was never indexed holds nothing to delete."""

    @abc.abstractmethod
    def count(self, *, encoder_version: str, collection_id: int | None = None, attribute_id: int | None = None) -> int:
        """The exact number of points, optionally only one image collection's and/or one attribute's."""

    @abc.abstractmethod
    def list_encoder_versions(self) -> list[str]:
        """Every encoder version that has a collection, sorted."""

    @abc.abstractmethod
    def optimize(self, *, encoder_version: str) -> None:
        """Make every point written so far fast to search (builds HNSW where the backend does not itself)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release files and connections; the index cannot be used afterwards."""

    def __enter__(self) -> VectorIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------
# Validation shared by both backends: everything is checked before anything is written.


def _as_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise InvalidInputError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidInputError(f"{what} must be an integer, got {value!r}") from None


def _check_dimension(dimension: object) -> int:
    dimension = _as_int(dimension, "dimension")
    if dimension < 1:
        raise InvalidInputError(f"dimension must be positive, got {dimension}")
    return dimension


def _prepare_points(
    encoder_version: str, points: Sequence[VectorPoint], dimension: int
) -> tuple[list[uuid.UUID], np.ndarray, list[dict]]:
    """Validate points and return their ids, their vectors as one (N, D) float32 matrix, and payloads."""
    ids = []
    payloads = []
    for point in points:
        image_id = _as_int(point.image_id, "image_id")
        attribute_id = _as_int(point.attribute_id, "attribute_id")
        collection_id = _as_int(point.collection_id, "collection_id")
        if len(point.vector) != dimension:
            raise DimensionMismatchError(
                expected=dimension,
                actual=len(point.vector),
                what=f"vector of image {image_id}, attribute {attribute_id} (encoder version {encoder_version!r})",
            )
        clashing = [key for key in RESERVED_PAYLOAD_KEYS if key in point.payload]
        if clashing:
            raise InvalidInputError(
                f"payload keys {clashing} are written by the vector index itself; "
                "pass image, attribute and collection ids as VectorPoint fields instead"
            )
        ids.append(point_id(image_id=image_id, attribute_id=attribute_id, encoder_version=encoder_version))
        payloads.append(
            {
                **point.payload,
                "encoder_version": encoder_version,
                "image_id": image_id,
                "attribute_id": attribute_id,
                "collection_id": collection_id,
            }
        )
    vectors = np.asarray([point.vector for point in points], dtype=np.float32).reshape(len(points), dimension)
    norms = np.linalg.norm(vectors, axis=1)  # (N,); inf or nan for a non-finite vector
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        row = int(np.argmax(bad))
        problem = "is all zeros (cosine similarity is undefined)" if norms[row] == 0 else "holds NaN or inf"
        raise InvalidInputError(
            f"vector of image {payloads[row]['image_id']}, attribute {payloads[row]['attribute_id']} "
            f"{problem}; check the encoder output before indexing"
        )
    return ids, vectors, payloads


def _query_vector(vector: np.ndarray | Sequence[float], dimension: int) -> np.ndarray:
    """The query as a (D,) float32 array, checked like a stored vector."""
    query = np.asarray(vector, dtype=np.float32)
    if query.ndim != 1 or query.shape[0] != dimension:
        raise DimensionMismatchError(expected=dimension, actual=int(query.size), what="query vector")
    norm = float(np.linalg.norm(query))
    if not np.isfinite(norm) or norm == 0:
        raise InvalidInputError("query vector must be finite and not all zeros")
    return query


def _filter_terms(
    collection_id: int | None, attribute_id: int | None, payload_filter: PayloadFilter | None
) -> list[tuple[str, PayloadScalar | list[str] | list[int]]]:
    """Backend-neutral equality (scalar) and any-of (list) conditions that must all hold."""
    terms: list[tuple[str, PayloadScalar | list[str] | list[int]]] = []
    if attribute_id is not None:
        terms.append(("attribute_id", _as_int(attribute_id, "attribute_id")))
    if collection_id is not None:
        terms.append(("collection_id", _as_int(collection_id, "collection_id")))
    for key, value in (payload_filter or {}).items():
        if not isinstance(key, str) or not key:
            raise InvalidInputError(f"payload filter keys must be non-empty strings, got {key!r}")
        if isinstance(value, str | bool):
            terms.append((key, value))
        elif isinstance(value, list | tuple | set | frozenset):
            values = list(value)
            if not values:
                raise InvalidInputError(f"payload filter on {key!r} has an empty list, which matches nothing")
            if all(isinstance(item, str) for item in values):
                terms.append((key, values))
            else:
                terms.append((key, [_as_int(item, f"payload filter value for {key!r}") for item in values]))
        else:
            try:
                terms.append((key, _as_int(value, f"payload filter value for {key!r}")))
            except InvalidInputError:
                raise InvalidInputError(
                    f"payload filter on {key!r}: {value!r} is not a str, int, bool or a list of str or int; "
                    "filters match exact values"
                ) from None
    return terms


def _image_ids(image_ids: Iterable[int]) -> list[int]:
    return [_as_int(image_id, "image id") for image_id in image_ids]


def _as_uuid(value: str | uuid.UUID) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise InvalidInputError(f"point id {value!r} is not a UUID; point ids come from point_id()") from None


def _check_limit(limit: int) -> int:
    limit = _as_int(limit, "limit")
    if limit < 1:
        raise InvalidInputError(f"limit must be at least 1, got {limit}")
    return limit


def _check_batch_size(batch_size: int) -> int:
    batch_size = _as_int(batch_size, "batch_size")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
    return batch_size


def _not_indexed(encoder_version: str) -> NotFoundError:
    return NotFoundError(
        f"no vectors exist for encoder version {encoder_version!r}; index images with this encoder "
        "version first (ensure_collection creates its collection)"
    )


def _hit(point_id_: object, score: float, payload: dict) -> SearchHit:
    return SearchHit(
        point_id=str(point_id_),
        image_id=payload["image_id"],
        attribute_id=payload["attribute_id"],
        collection_id=payload["collection_id"],
        score=float(score),
        payload=payload,
    )


# ---------------------------------------------------------------------------------------------------------
# Server backend: qdrant-client.


class QdrantServerIndex(VectorIndex):
    """The vector index on a Qdrant server (or qdrant-client's local mode in tests); owns `client`.

    Each encoder version lives in the physical collection `omniattr__<safe version>__v1`, reached through
    the alias `omniattr__<safe version>`; every read and write goes through the alias, so a re-index can
    fill a `__v2` collection and switch the alias without the callers noticing.
    """

    def __init__(self, client: QdrantClient, *, hnsw_ef: int = 128):
        self.client = client
        self.hnsw_ef = hnsw_ef
        # Local mode is brute force in Python: it has no HNSW and ignores payload indexes and search
        # params (and warns about them), so we leave them out there.
        options = client.init_options
        self.is_local_mode = options.get("location") == ":memory:" or options.get("path") is not None
        self._dimensions: dict[str, int] = {}

    @staticmethod
    def alias_name(encoder_version: str) -> str:
        """The alias every operation on this encoder version goes through."""
        return COLLECTION_PREFIX + safe_version_name(encoder_version)

    @classmethod
    def physical_name(cls, encoder_version: str) -> str:
        """The real collection behind the alias."""
        return cls.alias_name(encoder_version) + PHYSICAL_SUFFIX

    def _stored_dimension(self, collection_name: str) -> int | None:
        """The vector size of a collection or alias, or None when it does not exist."""
        if not self.client.collection_exists(collection_name):
            return None
        vectors = self.client.get_collection(collection_name).config.params.vectors
        if not isinstance(vectors, qm.VectorParams) or vectors.distance != qm.Distance.COSINE:
            raise ConflictError(
                f"Qdrant collection {collection_name!r} was not made by omniattr (it needs one unnamed cosine "
                "vector); rename or delete it"
            )
        return vectors.size

    def _dimension(self, encoder_version: str) -> int:
        """The dimension of an existing encoder version; NotFoundError if it was never indexed."""
        dimension = self._dimensions.get(encoder_version)
        if dimension is None:
            dimension = self._stored_dimension(self.alias_name(encoder_version))
            if dimension is None:
                raise _not_indexed(encoder_version)
            self._dimensions[encoder_version] = dimension
        return dimension

    def ensure_collection(self, *, encoder_version: str, dimension: int) -> None:
        """Create the aliased collection and its payload indexes if needed; safe to call every time."""
        dimension = _check_dimension(dimension)
        alias = self.alias_name(encoder_version)
        physical = self.physical_name(encoder_version)
        has_alias = self.client.collection_exists(alias)
        # Without the alias, the physical collection may still be there from a run that stopped half way.
        target = alias if has_alias else physical
        if not has_alias and not self.client.collection_exists(physical):
            try:
                self.client.create_collection(
                    collection_name=physical,
                    vectors_config=qm.VectorParams(size=dimension, distance=qm.Distance.COSINE),
                )
            except Exception:
                # Another worker may have created it between our check and our call.
                if not self.client.collection_exists(physical):
                    raise
        existing = self._stored_dimension(target)
        if existing != dimension:
            raise ConflictError(
                f"encoder version {encoder_version!r} already has vectors of dimension {existing}, not "
                f"{dimension}; an encoder version's dimension never changes, so give the new model a new version"
            )
        if not self.is_local_mode:
            schema = self.client.get_collection(target).payload_schema
            for key in INDEXED_PAYLOAD_KEYS:
                if key not in schema:
                    self.client.create_payload_index(
                        collection_name=target, field_name=key, field_schema=qm.PayloadSchemaType.INTEGER, wait=True
                    )
        if not has_alias:
            try:
                self.client.update_collection_aliases(
                    change_aliases_operations=[
                        qm.CreateAliasOperation(create_alias=qm.CreateAlias(collection_name=physical, alias_name=alias))
                    ]
                )
            except Exception:
                if not self.client.collection_exists(alias):
                    raise
        self._dimensions[encoder_version] = dimension

    def upsert(self, *, encoder_version: str, points: Sequence[VectorPoint], batch_size: int = 512) -> int:
        """Write points in batches of `batch_size`, each batch waited for."""
        batch_size = _check_batch_size(batch_size)
        dimension = self._dimension(encoder_version)
        ids, vectors, payloads = _prepare_points(encoder_version, points, dimension)
        alias = self.alias_name(encoder_version)
        for start in range(0, len(ids), batch_size):
            stop = start + batch_size
            self.client.upsert(
                collection_name=alias,
                points=qm.Batch(
                    ids=[str(id_) for id_ in ids[start:stop]],
                    vectors=vectors[start:stop].tolist(),
                    payloads=payloads[start:stop],
                ),
                wait=True,
            )
        return len(ids)

    @staticmethod
    def _filter(terms: list, excluded_image_ids: list[int]) -> qm.Filter | None:
        must = [
            qm.FieldCondition(
                key=key, match=qm.MatchAny(any=value) if isinstance(value, list) else qm.MatchValue(value=value)
            )
            for key, value in terms
        ]
        must_not = []
        if excluded_image_ids:
            must_not.append(qm.FieldCondition(key="image_id", match=qm.MatchAny(any=excluded_image_ids)))
        if not must and not must_not:
            return None
        return qm.Filter(must=must or None, must_not=must_not or None)

    def search(
        self,
        *,
        encoder_version: str,
        vector: np.ndarray | Sequence[float],
        collection_id: int | None,
        attribute_id: int,
        limit: int = 10,
        exclude_image_ids: Iterable[int] = (),
        payload_filter: PayloadFilter | None = None,
        exact: bool = False,
    ) -> list[SearchHit]:
        """Top-k by cosine similarity among one attribute's points, filtered as asked."""
        limit = _check_limit(limit)
        query = _query_vector(vector, self._dimension(encoder_version))
        query_filter = self._filter(
            _filter_terms(collection_id, attribute_id, payload_filter), _image_ids(exclude_image_ids)
        )
        params = None if self.is_local_mode else qm.SearchParams(hnsw_ef=self.hnsw_ef, exact=exact)
        response = self.client.query_points(
            collection_name=self.alias_name(encoder_version),
            query=query.tolist(),
            query_filter=query_filter,
            search_params=params,
            limit=limit,
            with_payload=True,
        )
        return [_hit(point.id, point.score, point.payload) for point in response.points]

    def fetch(self, *, encoder_version: str, point_ids: Iterable[str | uuid.UUID]) -> dict[str, np.ndarray]:
        """Stored (unit-length) vectors of the points that exist."""
        self._dimension(encoder_version)
        ids = [str(_as_uuid(id_)) for id_ in point_ids]
        if not ids:
            return {}
        records = self.client.retrieve(
            collection_name=self.alias_name(encoder_version), ids=ids, with_payload=False, with_vectors=True
        )
        return {str(record.id): np.asarray(record.vector, dtype=np.float32) for record in records}

    def delete_images(self, *, encoder_version: str, image_ids: Iterable[int]) -> None:
        """Delete every point of these images and wait until it is done."""
        image_ids = _image_ids(image_ids)
        if not image_ids:
            return
        try:
            self._dimension(encoder_version)
        except NotFoundError:
            return
        self.client.delete(
            collection_name=self.alias_name(encoder_version),
            points_selector=qm.FilterSelector(filter=self._filter([("image_id", image_ids)], [])),
            wait=True,
        )

    def count(self, *, encoder_version: str, collection_id: int | None = None, attribute_id: int | None = None) -> int:
        """Exact point count."""
        self._dimension(encoder_version)
        result = self.client.count(
            collection_name=self.alias_name(encoder_version),
            count_filter=self._filter(_filter_terms(collection_id, attribute_id, None), []),
            exact=True,
        )
        return result.count

    def list_encoder_versions(self) -> list[str]:
        """Versions whose alias exists (a collection without its alias was never finished)."""
        names = [alias.alias_name for alias in self.client.get_aliases().aliases]
        return sorted(
            version_from_safe_name(name[len(COLLECTION_PREFIX) :])
            for name in names
            if name.startswith(COLLECTION_PREFIX)
        )

    def optimize(self, *, encoder_version: str) -> None:
        """Nothing to do: a Qdrant server builds its HNSW index in the background (local mode has none)."""
        self._dimension(encoder_version)

    def close(self) -> None:
        """Close the client."""
        self.client.close()


# ---------------------------------------------------------------------------------------------------------
# Embedded backend: qdrant-edge.

EDGE_META_FILE = "omniattr_vectors.json"
EDGE_PARTITION_PREFIX = "attribute-"


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
    ):
        self.data_dir = Path(data_dir)
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

    def _dimension(self, encoder_version: str) -> int:
        dimension = self._dimension_or_none(encoder_version)
        if dimension is None:
            raise _not_indexed(encoder_version)
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

    def ensure_collection(self, *, encoder_version: str, dimension: int) -> None:
        """Record the version and its dimension if needed; safe to call every time."""
        dimension = _check_dimension(dimension)
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
        if existing != dimension:
            raise ConflictError(
                f"encoder version {encoder_version!r} already has vectors of dimension {existing}, not "
                f"{dimension}; an encoder version's dimension never changes, so give the new model a new version"
            )

    def upsert(self, *, encoder_version: str, points: Sequence[VectorPoint], batch_size: int = 512) -> int:
        """Write points in batches, each attribute's into its shard; builds HNSW past `auto_optimize_points`."""
        batch_size = _check_batch_size(batch_size)
        ids, vectors, payloads = _prepare_points(encoder_version, points, self._dimension(encoder_version))
        by_attribute: dict[int, list[int]] = {}
        for index, payload in enumerate(payloads):
            by_attribute.setdefault(payload["attribute_id"], []).append(index)
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
                self._optimize_shard(shard)
        return len(ids)

    @staticmethod
    def _optimize_shard(shard: qe.EdgeShard) -> None:
        shard.optimize()
        shard.flush()

    def optimize(self, *, encoder_version: str) -> None:
        """Build HNSW for every point written so far (blocking: tens of seconds per 10k points on 2 cores)."""
        self._dimension(encoder_version)
        for shard in self._partitions(encoder_version):
            self._optimize_shard(shard)

    def indexed_vectors_count(self, *, encoder_version: str) -> int:
        """How many vectors are in HNSW-indexed segments (the rest are searched by brute force)."""
        self._dimension(encoder_version)
        return sum(shard.info().indexed_vectors_count for shard in self._partitions(encoder_version))

    @staticmethod
    def _filter(terms: list, excluded_image_ids: list[int]) -> qe.Filter | None:
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

    def search(
        self,
        *,
        encoder_version: str,
        vector: np.ndarray | Sequence[float],
        collection_id: int | None,
        attribute_id: int,
        limit: int = 10,
        exclude_image_ids: Iterable[int] = (),
        payload_filter: PayloadFilter | None = None,
        exact: bool = False,
    ) -> list[SearchHit]:
        """Top-k by cosine similarity among one attribute's points, filtered as asked."""
        limit = _check_limit(limit)
        query = _query_vector(vector, self._dimension(encoder_version))
        # The shard holds one attribute only, so no attribute condition is needed (or wanted: it would cost a scan).
        terms = _filter_terms(collection_id, None, payload_filter)
        shard = self._partition(encoder_version, _as_int(attribute_id, "attribute_id"))
        if shard is None:  # nothing indexed under this attribute yet
            return []
        request = qe.QueryRequest(
            limit=limit,
            query=qe.Query.Nearest(query.tolist()),
            filter=self._filter(terms, _image_ids(exclude_image_ids)),
            params=qe.SearchParams(hnsw_ef=self.hnsw_ef, exact=exact),
            with_payload=True,
        )
        return [_hit(point.id, point.score, point.payload) for point in shard.query(request)]

    def fetch(self, *, encoder_version: str, point_ids: Iterable[str | uuid.UUID]) -> dict[str, np.ndarray]:
        """Stored (unit-length) vectors of the points that exist."""
        self._dimension(encoder_version)
        ids = [_as_uuid(id_) for id_ in point_ids]
        found: dict[str, np.ndarray] = {}
        for shard in self._partitions(encoder_version) if ids else []:
            missing = [id_ for id_ in ids if str(id_) not in found]
            if not missing:
                break
            for record in shard.retrieve(missing, with_payload=False, with_vector=True):
                found[str(record.id)] = np.asarray(record.vector, dtype=np.float32)
        return found

    def delete_images(self, *, encoder_version: str, image_ids: Iterable[int]) -> None:
        """Delete every point of these images."""
        image_ids = _image_ids(image_ids)
        if not image_ids or self._dimension_or_none(encoder_version) is None:
            return
        for shard in self._partitions(encoder_version):
            shard.update(qe.UpdateOperation.delete_points_by_filter(self._filter([("image_id", image_ids)], [])))

    def count(self, *, encoder_version: str, collection_id: int | None = None, attribute_id: int | None = None) -> int:
        """Exact point count."""
        self._dimension(encoder_version)
        request = qe.CountRequest(exact=True, filter=self._filter(_filter_terms(collection_id, None, None), []))
        if attribute_id is not None:
            shard = self._partition(encoder_version, _as_int(attribute_id, "attribute_id"))
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
        """Flush and close every open shard."""
        with self._lock:
            for shard in self._shards.values():
                shard.flush()
                shard.close()
            self._shards.clear()
            self._attribute_ids.clear()
            self._dimensions.clear()
            self._closed = True


def open_vector_index(
    *,
    kind: Literal["server", "embedded"],
    url: str | None = None,
    data_dir: Path | None = None,
    api_key: str | None = None,
) -> VectorIndex:
    """Open the vector index an entry point's settings describe."""
    if kind == "server":
        if url is None:
            raise InvalidInputError("a server vector index needs the Qdrant url, e.g. http://qdrant:6333")
        return QdrantServerIndex(QdrantClient(url=url, api_key=api_key))
    if kind == "embedded":
        if data_dir is None:
            raise InvalidInputError("an embedded vector index needs data_dir, the folder for its shards")
        return QdrantEdgeIndex(Path(data_dir))
    raise InvalidInputError(f"unknown vector index kind {kind!r}; use 'server' or 'embedded'")
