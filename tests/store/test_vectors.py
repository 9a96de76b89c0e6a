"""The vector index on both backends (qdrant-client local mode, Qdrant Edge): one suite, same answers."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from store.errors import (
    ConflictError,
    DimensionMismatchError,
    InsufficientStorageError,
    InvalidInputError,
    NotFoundError,
)
from store.vectors import (
    QdrantEdgeIndex,
    QdrantServerIndex,
    VectorIndex,
    VectorPoint,
    open_vector_index,
    point_id,
    safe_version_name,
    version_from_safe_name,
)

VERSION = "tiny-encoder@1.0"
DIMENSION = 16


def make_index(kind: str, tmp_path: Path) -> VectorIndex:
    if kind == "server":
        # qdrant-client local mode stands in for a Qdrant server: none can run here.
        return QdrantServerIndex(QdrantClient(location=":memory:"))
    return QdrantEdgeIndex(tmp_path / "vectors")


@pytest.fixture(params=["server", "edge"])
def index(request, tmp_path):
    """An empty vector index on each backend."""
    vector_index = make_index(request.param, tmp_path)
    yield vector_index
    vector_index.close()


def make_points(
    rng: np.random.Generator, *, images: int, attributes: int, collections: int, dimension: int = DIMENSION
) -> list[VectorPoint]:
    """A point per (image, attribute); image i is in collection i % collections, tag t(i // 2 % 3), rank i % 4."""
    vectors = rng.standard_normal((images * attributes, dimension)).astype(np.float32)  # (N, D)
    return [
        VectorPoint(
            image_id=image,
            attribute_id=attribute,
            collection_id=image % collections,
            vector=vectors[image * attributes + attribute],
            payload={"tag": f"t{image // 2 % 3}", "rank": image % 4},
        )
        for image in range(images)
        for attribute in range(attributes)
    ]


def exact_top_k(points, query, k, keep) -> list[int]:
    """Image ids of the k points most cosine-similar to query among those `keep` accepts (numpy)."""
    kept = [point for point in points if keep(point)]
    if not kept:
        return []
    vectors = np.stack([np.asarray(point.vector, dtype=np.float64) for point in kept])  # (M, D)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = vectors @ (query / np.linalg.norm(query))  # (M,)
    return [kept[row].image_id for row in np.argsort(-scores, kind="stable")[:k]]


def unit(vector) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def test_point_id_is_deterministic_uuid5():
    first = point_id(image_id=7, attribute_id=3, encoder_version=VERSION)
    assert first == point_id(image_id=7, attribute_id=3, encoder_version=VERSION)
    assert first.version == 5
    assert first != point_id(image_id=7, attribute_id=3, encoder_version="tiny-encoder@1.1")
    assert first != point_id(image_id=3, attribute_id=7, encoder_version=VERSION)


def test_safe_version_names_are_reversible_and_distinct():
    versions = ["clip/ViT-B@1.0", "a.b", "a_b", "a-b", "ünï"]
    names = [safe_version_name(version) for version in versions]
    assert len(set(names)) == len(versions)
    assert all(set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-_") for name in names)
    assert safe_version_name("V1") != safe_version_name("v1")
    assert [version_from_safe_name(name) for name in names] == versions
    with pytest.raises(InvalidInputError, match="non-empty"):
        safe_version_name("")


@pytest.mark.slow
def test_upsert_count_fetch_delete_round_trip(index):
    rng = np.random.default_rng(0)
    points = make_points(rng, images=12, attributes=3, collections=2)
    index.ensure_collection(encoder_version=VERSION, dimension=DIMENSION)
    assert index.upsert(encoder_version=VERSION, points=points, batch_size=5) == 36

    assert index.count(encoder_version=VERSION) == 36
    assert index.count(encoder_version=VERSION, collection_id=1) == 18
    assert index.count(encoder_version=VERSION, attribute_id=2) == 12
    assert index.count(encoder_version=VERSION, collection_id=0, attribute_id=2) == 6

    wanted = {
        str(point_id(image_id=p.image_id, attribute_id=p.attribute_id, encoder_version=VERSION)): p for p in points[:4]
    }
    missing = str(point_id(image_id=999, attribute_id=0, encoder_version=VERSION))
    fetched = index.fetch(encoder_version=VERSION, point_ids=[*wanted, missing])
    assert set(fetched) == set(wanted)
    for key, point in wanted.items():
        assert fetched[key].dtype == np.float32
        # Cosine collections store unit vectors.
        np.testing.assert_allclose(fetched[key], unit(point.vector), atol=1e-6)
    assert index.fetch(encoder_version=VERSION, point_ids=[uuid.UUID(next(iter(wanted)))]).keys() == {
        next(iter(wanted))
    }

    index.delete_images(encoder_version=VERSION, image_ids=[0, 1, 5])
    assert index.count(encoder_version=VERSION) == 36 - 9
    assert index.count(encoder_version=VERSION, collection_id=1) == 18 - 6
    assert index.fetch(encoder_version=VERSION, point_ids=list(wanted)).keys() == {
        key for key, point in wanted.items() if point.image_id not in (0, 1, 5)
    }
    index.delete_images(encoder_version=VERSION, image_ids=[])
    assert index.count(encoder_version=VERSION) == 27


@pytest.mark.slow
def test_ensure_collection_is_idempotent_and_keeps_its_dimension(index):
    index.ensure_collection(encoder_version=VERSION, dimension=DIMENSION)
    index.upsert(
        encoder_version=VERSION, points=make_points(np.random.default_rng(1), images=2, attributes=2, collections=1)
    )
    index.ensure_collection(encoder_version=VERSION, dimension=DIMENSION)
    assert index.count(encoder_version=VERSION) == 4
    with pytest.raises(ConflictError, match=f"dimension {DIMENSION}, not 32"):
        index.ensure_collection(encoder_version=VERSION, dimension=32)
    index.ensure_collection(encoder_version="a.b", dimension=4)
    index.ensure_collection(encoder_version="a_b", dimension=8)
    assert index.list_encoder_versions() == sorted([VERSION, "a.b", "a_b"])
    assert index.count(encoder_version="a.b") == 0


@pytest.mark.slow
def test_reupsert_overwrites_instead_of_duplicating(index):
    rng = np.random.default_rng(2)
    points = make_points(rng, images=5, attributes=2, collections=1)
    index.ensure_collection(encoder_version=VERSION, dimension=DIMENSION)
    index.upsert(encoder_version=VERSION, points=points)
    changed = [
        VectorPoint(
            image_id=p.image_id, attribute_id=p.attribute_id, collection_id=3, vector=-p.vector, payload={"tag": "new"}
        )
        for p in points
    ]
    index.upsert(encoder_version=VERSION, points=changed)
    assert index.count(encoder_version=VERSION) == 10
    assert index.count(encoder_version=VERSION, collection_id=3) == 10
    key = str(point_id(image_id=4, attribute_id=1, encoder_version=VERSION))
    np.testing.assert_allclose(
        index.fetch(encoder_version=VERSION, point_ids=[key])[key], unit(-points[9].vector), atol=1e-6
    )
    hits = index.search(encoder_version=VERSION, vector=-points[9].vector, collection_id=3, attribute_id=1, limit=1)
    assert hits[0].point_id == key
    assert hits[0].payload == {
        "tag": "new",
        "encoder_version": VERSION,
        "image_id": 4,
        "attribute_id": 1,
        "collection_id": 3,
    }
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_search_filters_match_numpy_ground_truth(index):
    rng = np.random.default_rng(3)
    points = make_points(rng, images=60, attributes=3, collections=3)
    index.ensure_collection(encoder_version=VERSION, dimension=DIMENSION)
    index.upsert(encoder_version=VERSION, points=points)
    query = rng.standard_normal(DIMENSION)

    cases = [
        (dict(collection_id=1, attribute_id=2), lambda p: p.collection_id == 1 and p.attribute_id == 2),
        (dict(collection_id=None, attribute_id=0), lambda p: p.attribute_id == 0),
        (
            dict(collection_id=None, attribute_id=1, payload_filter={"tag": "t2"}),
            lambda p: p.attribute_id == 1 and p.payload["tag"] == "t2",
        ),
        (
            dict(collection_id=2, attribute_id=1, payload_filter={"tag": ["t0", "t1"], "rank": [1, 3]}),
            lambda p: (
                p.collection_id == 2
                and p.attribute_id == 1
                and p.payload["tag"] != "t2"
                and p.payload["rank"] in (1, 3)
            ),
        ),
        (
            dict(collection_id=0, attribute_id=0, payload_filter={"rank": 0}, exclude_image_ids=[12, 24]),
            lambda p: (
                p.collection_id == 0 and p.attribute_id == 0 and p.payload["rank"] == 0 and p.image_id not in (12, 24)
            ),
        ),
    ]
    for arguments, keep in cases:
        hits = index.search(encoder_version=VERSION, vector=query, limit=5, **arguments)
        assert [hit.image_id for hit in hits] == exact_top_k(points, query, 5, keep), arguments
        assert all(keep(points[hit.image_id * 3 + hit.attribute_id]) for hit in hits)
        assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)

    excluded = [
        hit.image_id for hit in index.search(encoder_version=VERSION, vector=query, collection_id=None, attribute_id=0)
    ]
    hits = index.search(
        encoder_version=VERSION, vector=query, collection_id=None, attribute_id=0, exclude_image_ids=excluded[:3]
    )
    assert not {hit.image_id for hit in hits} & set(excluded[:3])
    assert [hit.image_id for hit in hits][:7] == excluded[3:]
    assert index.search(encoder_version=VERSION, vector=query, collection_id=9, attribute_id=0) == []

    with pytest.raises(InvalidInputError, match="not a str, int, bool"):
        index.search(
            encoder_version=VERSION, vector=query, collection_id=None, attribute_id=0, payload_filter={"rank": 0.5}
        )
    with pytest.raises(InvalidInputError, match="empty list"):
        index.search(
            encoder_version=VERSION, vector=query, collection_id=None, attribute_id=0, payload_filter={"tag": []}
        )
    with pytest.raises(InvalidInputError, match="limit"):
        index.search(encoder_version=VERSION, vector=query, collection_id=None, attribute_id=0, limit=0)


def test_wrong_dimension_names_both_and_writes_nothing(index):
    points = make_points(np.random.default_rng(4), images=4, attributes=2, collections=1)
    points[-1] = VectorPoint(image_id=3, attribute_id=1, collection_id=0, vector=[0.5] * (DIMENSION + 1))
    index.ensure_collection(encoder_version=VERSION, dimension=DIMENSION)
    with pytest.raises(DimensionMismatchError, match=f"dimension {DIMENSION + 1}.*expects {DIMENSION}") as raised:
        index.upsert(encoder_version=VERSION, points=points, batch_size=1)
    assert (raised.value.expected, raised.value.actual) == (DIMENSION, DIMENSION + 1)
    assert index.count(encoder_version=VERSION) == 0

    with pytest.raises(DimensionMismatchError, match="query vector") as raised:
        index.search(encoder_version=VERSION, vector=np.ones(DIMENSION - 1), collection_id=None, attribute_id=0)
    assert (raised.value.expected, raised.value.actual) == (DIMENSION, DIMENSION - 1)


def test_bad_values_are_rejected_before_writing(index):
    index.ensure_collection(encoder_version=VERSION, dimension=DIMENSION)
    good = make_points(np.random.default_rng(5), images=3, attributes=1, collections=1)
    nan_vector = np.ones(DIMENSION, dtype=np.float32)
    nan_vector[3] = np.nan
    bad_points = [
        (VectorPoint(image_id=9, attribute_id=0, collection_id=0, vector=nan_vector), "NaN or inf"),
        (VectorPoint(image_id=9, attribute_id=0, collection_id=0, vector=np.zeros(DIMENSION)), "all zeros"),
        (
            VectorPoint(
                image_id=9, attribute_id=0, collection_id=0, vector=np.ones(DIMENSION), payload={"image_id": 1}
            ),
            "reserved|written by",
        ),
        (
            VectorPoint(image_id=9.5, attribute_id=0, collection_id=0, vector=np.ones(DIMENSION)),
            "image_id must be an integer",
        ),
    ]
    for bad, message in bad_points:
        with pytest.raises(InvalidInputError, match=message):
            index.upsert(encoder_version=VERSION, points=[*good, bad])
    assert index.count(encoder_version=VERSION) == 0
    with pytest.raises(InvalidInputError, match="finite"):
        index.search(encoder_version=VERSION, vector=np.full(DIMENSION, np.inf), collection_id=None, attribute_id=0)
    with pytest.raises(InvalidInputError, match="not a UUID"):
        index.fetch(encoder_version=VERSION, point_ids=["image-1"])


def test_unknown_encoder_version_is_not_found(index):
    index.ensure_collection(encoder_version=VERSION, dimension=DIMENSION)
    calls = {
        "search": lambda: index.search(
            encoder_version="never", vector=np.ones(DIMENSION), collection_id=None, attribute_id=0
        ),
        "fetch": lambda: index.fetch(encoder_version="never", point_ids=[]),
        "count": lambda: index.count(encoder_version="never"),
        "upsert": lambda: index.upsert(encoder_version="never", points=[]),
        "optimize": lambda: index.optimize(encoder_version="never"),
    }
    for name, call in calls.items():
        with pytest.raises(NotFoundError, match="'never'.*index images") as raised:
            call()
        assert "never" in str(raised.value), name
    index.delete_images(encoder_version="never", image_ids=[1])  # nothing to delete is not an error
    assert index.list_encoder_versions() == [VERSION]


@pytest.mark.slow
def test_search_agrees_with_exact_ground_truth(index):
    rng = np.random.default_rng(6)
    points = make_points(rng, images=200, attributes=2, collections=2)
    index.ensure_collection(encoder_version=VERSION, dimension=DIMENSION)
    index.upsert(encoder_version=VERSION, points=points, batch_size=64)
    index.optimize(encoder_version=VERSION)
    for query in rng.standard_normal((10, DIMENSION)):
        truth = exact_top_k(points, query, 10, lambda p: p.attribute_id == 1)
        for exact in (False, True):
            hits = index.search(encoder_version=VERSION, vector=query, collection_id=None, attribute_id=1, exact=exact)
            assert [hit.image_id for hit in hits] == truth
            expected_scores = [float(unit(points[hit.image_id * 2 + 1].vector) @ unit(query)) for hit in hits]
            np.testing.assert_allclose([hit.score for hit in hits], expected_scores, atol=1e-5)


@pytest.mark.slow
def test_both_backends_return_the_same_hits(tmp_path):
    rng = np.random.default_rng(7)
    points = make_points(rng, images=150, attributes=2, collections=3)
    queries = rng.standard_normal((8, DIMENSION))
    answers = {}
    for kind in ("server", "edge"):
        with make_index(kind, tmp_path) as index:
            index.ensure_collection(encoder_version=VERSION, dimension=DIMENSION)
            index.upsert(encoder_version=VERSION, points=points)
            index.delete_images(encoder_version=VERSION, image_ids=[3, 4])
            answers[kind] = (
                index.count(encoder_version=VERSION, collection_id=2),
                [
                    [
                        (hit.point_id, round(hit.score, 5), hit.payload["tag"])
                        for hit in index.search(
                            encoder_version=VERSION,
                            vector=query,
                            collection_id=row % 3,
                            attribute_id=row % 2,
                            payload_filter={"rank": [0, 1, 2]},
                            exclude_image_ids=[5],
                        )
                    ]
                    for row, query in enumerate(queries)
                ],
            )
    assert answers["server"] == answers["edge"]
    assert all(len(hits) == 10 for hits in answers["edge"][1])


@pytest.mark.slow
def test_edge_reopen_after_close_keeps_points_and_dimension(tmp_path):
    points = make_points(np.random.default_rng(8), images=30, attributes=2, collections=2)
    query = np.random.default_rng(9).standard_normal(DIMENSION)
    with QdrantEdgeIndex(tmp_path / "vectors") as index:
        index.ensure_collection(encoder_version=VERSION, dimension=DIMENSION)
        index.upsert(encoder_version=VERSION, points=points)
        index.delete_images(encoder_version=VERSION, image_ids=[0])
        before = index.search(encoder_version=VERSION, vector=query, collection_id=1, attribute_id=1)
    with pytest.raises(RuntimeError, match="closed"):
        index.count(encoder_version=VERSION)

    with QdrantEdgeIndex(tmp_path / "vectors") as reopened:
        assert reopened.list_encoder_versions() == [VERSION]
        assert reopened.count(encoder_version=VERSION) == 58
        assert reopened.search(encoder_version=VERSION, vector=query, collection_id=1, attribute_id=1) == before
        # The dimension is known without ensure_collection.
        with pytest.raises(DimensionMismatchError, match=f"expects {DIMENSION}"):
            reopened.upsert(
                encoder_version=VERSION,
                points=[VectorPoint(image_id=1, attribute_id=0, collection_id=0, vector=[1.0, 2.0])],
            )
        with pytest.raises(ConflictError):
            reopened.ensure_collection(encoder_version=VERSION, dimension=DIMENSION * 2)


def test_server_reaches_its_collection_through_an_alias_that_persists(tmp_path):
    points = make_points(np.random.default_rng(10), images=5, attributes=2, collections=1)
    with QdrantServerIndex(QdrantClient(path=str(tmp_path / "qdrant"))) as index:
        index.ensure_collection(encoder_version=VERSION, dimension=DIMENSION)
        index.upsert(encoder_version=VERSION, points=points)
        aliases = {alias.alias_name: alias.collection_name for alias in index.client.get_aliases().aliases}
        alias = QdrantServerIndex.alias_name(VERSION)
        assert aliases == {alias: alias + "__v1"}
        assert [c.name for c in index.client.get_collections().collections] == [alias + "__v1"]
    with QdrantServerIndex(QdrantClient(path=str(tmp_path / "qdrant"))) as reopened:
        assert reopened.list_encoder_versions() == [VERSION]
        assert reopened.count(encoder_version=VERSION) == 10


@pytest.mark.slow
def test_edge_hnsw_recall_at_10_with_filters(tmp_path):
    """HNSW is really built (by the automatic optimisation) and filtered searches go through it."""
    dimension, images, attributes = 64, 2000, 2
    rng = np.random.default_rng(11)
    points = make_points(rng, images=images, attributes=attributes, collections=2, dimension=dimension)
    # Full-scan threshold 50 KB = 200 vectors of 64 floats: every filter below matches more, so uses HNSW.
    # The automatic build triggers per attribute shard (2000 points each once all are written).
    index = QdrantEdgeIndex(
        tmp_path / "vectors", full_scan_threshold_kb=50, indexing_threshold_kb=100, auto_optimize_points=2000
    )
    with index:
        index.ensure_collection(encoder_version=VERSION, dimension=dimension)
        index.upsert(encoder_version=VERSION, points=points[:3000])
        assert index.indexed_vectors_count(encoder_version=VERSION) == 0
        index.upsert(encoder_version=VERSION, points=points[3000:])
        assert index.indexed_vectors_count(encoder_version=VERSION) == 4000

        recalls = []
        for row, query in enumerate(rng.standard_normal((40, dimension))):
            collection_id = None if row % 2 else row % 4 // 2
            attribute_id = row % attributes

            def keep(p, collection_id=collection_id, attribute_id=attribute_id):
                return p.attribute_id == attribute_id and collection_id in (None, p.collection_id)

            truth = exact_top_k(points, query, 10, keep)
            hits = index.search(
                encoder_version=VERSION, vector=query, collection_id=collection_id, attribute_id=attribute_id
            )
            recalls.append(len({hit.image_id for hit in hits} & set(truth)) / 10)
            exact_hits = index.search(
                encoder_version=VERSION,
                vector=query,
                collection_id=collection_id,
                attribute_id=attribute_id,
                exact=True,
            )
            assert [hit.image_id for hit in exact_hits] == truth
        assert np.mean(recalls) >= 0.95, recalls


def test_open_vector_index(tmp_path):
    with open_vector_index(kind="embedded", data_dir=tmp_path / "vectors") as index:
        assert isinstance(index, QdrantEdgeIndex)
        assert index.list_encoder_versions() == []
    with pytest.raises(InvalidInputError, match="url"):
        open_vector_index(kind="server")
    with pytest.raises(InvalidInputError, match="data_dir"):
        open_vector_index(kind="embedded")
    with pytest.raises(InvalidInputError, match="'server' or 'embedded'"):
        open_vector_index(kind="cloud", url="http://qdrant:6333")


def test_edge_refuses_writes_that_would_eat_into_the_disk_reserve(tmp_path):
    """Edge's segments are memory-mapped: a write on a full disk is a SIGBUS, so the reserve is checked first.
    The reserve is set above the free space (no disk is filled)."""
    points = make_points(np.random.default_rng(0), images=6, attributes=1, collections=1)
    with QdrantEdgeIndex(tmp_path / "vectors") as roomy:
        roomy.ensure_collection(encoder_version=VERSION, dimension=DIMENSION)
        roomy.upsert(encoder_version=VERSION, points=points[:3])
    free = shutil.disk_usage(tmp_path).free
    with QdrantEdgeIndex(tmp_path / "vectors", reserve_bytes=free + 2**30) as full:
        with pytest.raises(InsufficientStorageError, match="vector index.*OMNIATTR_DISK_RESERVE_MB"):
            full.upsert(encoder_version=VERSION, points=points[3:])
        with pytest.raises(InsufficientStorageError, match="vector index"):
            full.optimize(encoder_version=VERSION)
        assert full.count(encoder_version=VERSION) == 3  # reads still work; nothing was written
    opened = open_vector_index(kind="embedded", data_dir=tmp_path / "vectors", reserve_bytes=free + 2**30)
    with opened, pytest.raises(InsufficientStorageError):
        opened.upsert(encoder_version=VERSION, points=points[3:])


@pytest.mark.slow
def test_store_vectors_never_imports_torch():
    code = "import sys, store.vectors; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
