"""The vector index on a Qdrant server through qdrant-client (or qdrant-client's local mode in tests).

Tests use local mode (`QdrantClient(location=":memory:")`), which is brute force in Python and ignores
payload indexes; the suite in tests/store/test_vectors.py runs on this backend and on Qdrant Edge.
"""

from __future__ import annotations

import uuid

import numpy as np
from qdrant_client import QdrantClient
from qdrant_client import models as qm

from store.errors import ConflictError
from store.vectors.interface import (
    INDEXED_PAYLOAD_KEYS,
    FilterTerm,
    SearchHit,
    SearchRequest,
    VectorIndex,
    check_stored_dimension,
    safe_version_name,
    search_hit,
    version_from_safe_name,
)

COLLECTION_PREFIX = "omniattr__"
# The physical collection behind an alias; a new layout (e.g. quantized) would get "__v2" and a re-index.
PHYSICAL_SUFFIX = "__v1"


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

    def _dimension_or_none(self, encoder_version: str) -> int | None:
        dimension = self._dimensions.get(encoder_version)
        if dimension is None:
            dimension = self._stored_dimension(self.alias_name(encoder_version))
            if dimension is not None:
                self._dimensions[encoder_version] = dimension
        return dimension

    def _ensure_collection(self, encoder_version: str, dimension: int) -> None:
        """Create the aliased collection and its payload indexes if needed."""
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
        check_stored_dimension(encoder_version, stored=self._stored_dimension(target), wanted=dimension)
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

    def _write(
        self, encoder_version: str, ids: list[uuid.UUID], vectors: np.ndarray, payloads: list[dict], *, batch_size: int
    ) -> None:
        """Write points in batches of `batch_size`, each batch waited for."""
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

    @staticmethod
    def _filter(terms: list[FilterTerm], excluded_image_ids: list[int]) -> qm.Filter | None:
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

    def _search(self, encoder_version: str, request: SearchRequest) -> list[SearchHit]:
        """Top-k by cosine similarity, the attribute a filter condition like the others."""
        query_filter = self._filter(
            [("attribute_id", request.attribute_id), *request.terms], request.excluded_image_ids
        )
        params = None if self.is_local_mode else qm.SearchParams(hnsw_ef=self.hnsw_ef, exact=request.exact)
        response = self.client.query_points(
            collection_name=self.alias_name(encoder_version),
            query=request.query.tolist(),
            query_filter=query_filter,
            search_params=params,
            limit=request.limit,
            with_payload=True,
        )
        return [search_hit(point.id, point.score, point.payload) for point in response.points]

    def _fetch(self, encoder_version: str, ids: list[uuid.UUID]) -> dict[str, np.ndarray]:
        records = self.client.retrieve(
            collection_name=self.alias_name(encoder_version),
            ids=[str(id_) for id_ in ids],
            with_payload=False,
            with_vectors=True,
        )
        return {str(record.id): np.asarray(record.vector, dtype=np.float32) for record in records}

    def _fetch_payloads(self, encoder_version: str, ids: list[uuid.UUID]) -> dict[str, dict]:
        records = self.client.retrieve(
            collection_name=self.alias_name(encoder_version),
            ids=[str(id_) for id_ in ids],
            with_payload=True,
            with_vectors=False,
        )
        return {str(record.id): dict(record.payload or {}) for record in records}

    def _delete_where(self, encoder_version: str, terms: list[FilterTerm]) -> None:
        """Delete by a filter and wait until it is done."""
        self.client.delete(
            collection_name=self.alias_name(encoder_version),
            points_selector=qm.FilterSelector(filter=self._filter(terms, [])),
            wait=True,
        )

    def _count(self, encoder_version: str, *, terms: list[FilterTerm], attribute_id: int | None) -> int:
        if attribute_id is not None:
            terms = [("attribute_id", attribute_id), *terms]
        result = self.client.count(
            collection_name=self.alias_name(encoder_version), count_filter=self._filter(terms, []), exact=True
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
