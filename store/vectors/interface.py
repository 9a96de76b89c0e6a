"""The vector index's interface: `VectorIndex`, its point and hit types, point ids and the checks both backends share.

A point is one (image, attribute) embedding. Its id is deterministic (`point_id`), so writing the same
image and attribute again overwrites the point instead of adding a second one. Every payload records the
encoder version, image, attribute and image collection, so vectors of two models are never compared.

`VectorIndex`'s public methods check every argument here, once for both backends, before anything is
written; a backend implements only the hooks (`_write`, `_search`, ...) that speak to its engine.
"""

from __future__ import annotations

import abc
import functools
import operator
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from store.errors import ConflictError, DimensionMismatchError, InvalidInputError, NotFoundError

# Fixed forever: changing it would give every stored point a new id.
POINT_ID_NAMESPACE = uuid.UUID("3473e2cc-a543-4889-b57a-01819bf933ac")

# Payload keys the index writes itself; a point's extra payload may not use them.
RESERVED_PAYLOAD_KEYS = ("encoder_version", "image_id", "attribute_id", "collection_id")
# Integer payload fields with a payload index: the filters every search and delete uses.
INDEXED_PAYLOAD_KEYS = ("collection_id", "attribute_id", "image_id")

SAFE_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
# Qdrant limits collection names to 255 characters; keep room for the prefix and suffix.
MAX_SAFE_VERSION_LENGTH = 200

PayloadScalar = str | int | bool
PayloadFilter = Mapping[str, PayloadScalar | Sequence[str] | Sequence[int]]
# One checked filter condition: equality for a scalar, any-of for a list; a backend turns a list of them
# (all must hold) into its engine's filter.
FilterTerm = tuple[str, PayloadScalar | list[str] | list[int]]


@dataclass(slots=True)
class VectorPoint:
    """One (image, attribute) embedding to write."""

    image_id: int
    attribute_id: int
    collection_id: int
    vector: np.ndarray | list[float]  # (D,)
    payload: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SearchRequest:
    """A search's arguments as `VectorIndex.search` checked them, for a backend's `_search`."""

    query: np.ndarray  # (D,) float32, finite, not all zeros
    attribute_id: int
    terms: list[FilterTerm]  # collection and payload conditions; the attribute is the backend's to apply
    excluded_image_ids: list[int]
    limit: int
    exact: bool


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
    """Top-k search over (image, attribute) embeddings, one collection per encoder version.

    The public methods check their arguments and call the backend's hooks with checked values.
    """

    def ensure_collection(self, *, encoder_version: str, dimension: int) -> None:
        """Create the collection for an encoder version if needed; ConflictError if its dimension differs."""
        self._ensure_collection(encoder_version, _check_dimension(dimension))

    def upsert(self, *, encoder_version: str, points: Sequence[VectorPoint], batch_size: int = 512) -> int:
        """Write points (overwriting same image and attribute) and return how many were written."""
        batch_size = _check_positive(batch_size, "batch_size")
        ids, vectors, payloads = _prepare_points(encoder_version, points, self._dimension(encoder_version))
        self._write(encoder_version, ids, vectors, payloads, batch_size=batch_size)
        return len(ids)

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
        limit = _check_positive(limit, "limit")
        request = SearchRequest(
            query=_query_vector(vector, self._dimension(encoder_version)),
            attribute_id=_as_int(attribute_id, "attribute_id"),
            terms=_filter_terms(collection_id, payload_filter),
            excluded_image_ids=_image_ids(exclude_image_ids),
            limit=limit,
            exact=exact,
        )
        return self._search(encoder_version, request)

    def fetch(self, *, encoder_version: str, point_ids: Iterable[str | uuid.UUID]) -> dict[str, np.ndarray]:
        """Stored vectors by point id (unit length: cosine collections normalise on write); missing ids absent."""
        self._dimension(encoder_version)
        ids = [_as_uuid(id_) for id_ in point_ids]
        return self._fetch(encoder_version, ids) if ids else {}

    def fetch_payloads(self, *, encoder_version: str, point_ids: Iterable[str | uuid.UUID]) -> dict[str, dict]:
        """Stored payloads by point id (e.g. to check the image content a point encodes); missing ids absent."""
        if self._dimension_or_none(encoder_version) is None:
            return {}
        ids = [_as_uuid(id_) for id_ in point_ids]
        return self._fetch_payloads(encoder_version, ids) if ids else {}

    def delete_images(self, *, encoder_version: str, image_ids: Iterable[int]) -> None:
        """Delete every point of these images; a version that was never indexed holds nothing to delete."""
        image_ids = _image_ids(image_ids)
        if image_ids and self._dimension_or_none(encoder_version) is not None:
            self._delete_where(encoder_version, [("image_id", image_ids)])

    def delete_collection(self, *, encoder_version: str, collection_id: int) -> None:
        """Delete every point of an image collection, whatever its images' rows say (they may be gone)."""
        collection_id = _as_int(collection_id, "collection_id")
        if self._dimension_or_none(encoder_version) is not None:
            self._delete_where(encoder_version, [("collection_id", collection_id)])

    def count(self, *, encoder_version: str, collection_id: int | None = None, attribute_id: int | None = None) -> int:
        """The exact number of points, optionally only one image collection's and/or one attribute's."""
        self._dimension(encoder_version)
        return self._count(
            encoder_version,
            terms=_filter_terms(collection_id, None),
            attribute_id=None if attribute_id is None else _as_int(attribute_id, "attribute_id"),
        )

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

    def _dimension(self, encoder_version: str) -> int:
        """The dimension of an existing encoder version; NotFoundError if it was never indexed."""
        dimension = self._dimension_or_none(encoder_version)
        if dimension is None:
            raise NotFoundError(
                f"no vectors exist for encoder version {encoder_version!r}; index images with this encoder "
                "version first (ensure_collection creates its collection)"
            )
        return dimension

    # --- the backend's hooks: arguments arrive checked ---------------------------------------------------

    @abc.abstractmethod
    def _dimension_or_none(self, encoder_version: str) -> int | None:
        """The dimension of an encoder version's collection, or None if it has none (yet)."""

    @abc.abstractmethod
    def _ensure_collection(self, encoder_version: str, dimension: int) -> None:
        """Create the version's collection if needed; `check_stored_dimension` against what exists."""

    @abc.abstractmethod
    def _write(
        self, encoder_version: str, ids: list[uuid.UUID], vectors: np.ndarray, payloads: list[dict], *, batch_size: int
    ) -> None:
        """Upsert points: `vectors` is (N, D) float32, row i has id `ids[i]` and payload `payloads[i]`."""

    @abc.abstractmethod
    def _search(self, encoder_version: str, request: SearchRequest) -> list[SearchHit]:
        """Top-`limit` hits for the query among the attribute's points that match every term, best first."""

    @abc.abstractmethod
    def _fetch(self, encoder_version: str, ids: list[uuid.UUID]) -> dict[str, np.ndarray]:
        """Stored vectors of the points among `ids` (at least one) that exist, by id."""

    @abc.abstractmethod
    def _fetch_payloads(self, encoder_version: str, ids: list[uuid.UUID]) -> dict[str, dict]:
        """Stored payloads of the points among `ids` (at least one) that exist, by id."""

    @abc.abstractmethod
    def _delete_where(self, encoder_version: str, terms: list[FilterTerm]) -> None:
        """Delete every point that matches every term (at least one) from an existing version."""

    @abc.abstractmethod
    def _count(self, encoder_version: str, *, terms: list[FilterTerm], attribute_id: int | None) -> int:
        """Exact number of points that match every term, within one attribute when it is given."""


# ---------------------------------------------------------------------------------------------------------
# Helpers for the backends.


def check_stored_dimension(encoder_version: str, *, stored: int, wanted: int) -> None:
    """ConflictError unless an existing collection's dimension is the one asked for."""
    if stored != wanted:
        raise ConflictError(
            f"encoder version {encoder_version!r} already has vectors of dimension {stored}, not "
            f"{wanted}; an encoder version's dimension never changes, so give the new model a new version"
        )


def search_hit(point_id_: object, score: float, payload: dict) -> SearchHit:
    """A `SearchHit` from a stored point's id, score and payload."""
    return SearchHit(
        point_id=str(point_id_),
        image_id=payload["image_id"],
        attribute_id=payload["attribute_id"],
        collection_id=payload["collection_id"],
        score=float(score),
        payload=payload,
    )


# ---------------------------------------------------------------------------------------------------------
# Argument checks: everything is checked before anything is written.


def _as_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise InvalidInputError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidInputError(f"{what} must be an integer, got {value!r}") from None


def _check_positive(value: object, what: str) -> int:
    value = _as_int(value, what)
    if value < 1:
        raise InvalidInputError(f"{what} must be at least 1, got {value}")
    return value


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


def _filter_terms(collection_id: int | None, payload_filter: PayloadFilter | None) -> list[FilterTerm]:
    """Equality (scalar) and any-of (list) conditions that must all hold; the attribute is the backend's."""
    terms: list[FilterTerm] = []
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
