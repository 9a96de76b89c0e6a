"""Issue 16 in the store: ids never reused (on both engines, also after migrating an existing database), a
finished shard never reopened, and vectors removable by collection and tied to their content on both backends."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import text

from omniattr.domain import JobKind, ShardStatus
from store import metadata
from store.database import make_engine, make_session_factory, upgrade_database
from store.vectors import VectorPoint, point_id
from tests.store.test_vectors import DIMENSION, VERSION, index  # noqa: F401 - the both-backends fixture


@pytest.mark.slow
def test_migrating_an_existing_database_keeps_its_rows_and_stops_id_reuse(empty_database_url):
    upgrade_database(empty_database_url, revision="0001")
    engine = make_engine(empty_database_url)
    try:
        with engine.begin() as connection:  # a collection with an image, written by the first schema
            connection.execute(text("INSERT INTO collections (name, description) VALUES ('kept', '')"))
            connection.execute(
                text(
                    "INSERT INTO images (collection_id, source, sha256, bytes, status, metadata) "
                    "SELECT id, 'a.png', '" + "a" * 64 + "', 0, 'ready', '{}' FROM collections"
                )
            )
        upgrade_database(empty_database_url)
        sessions = make_session_factory(engine)
        with sessions.begin() as session:
            [kept] = metadata.list_collections(session)
            assert [image.source for image in metadata.list_images(session, collection_id=kept.id)] == ["a.png"]
            doomed = metadata.create_collection(session, name="doomed")
            doomed_image, _ = metadata.add_image(
                session, collection_id=doomed.id, source="b.png", sha256="b" * 64, bytes=1
            )
            doomed_ids = doomed.id, doomed_image.id
        with sessions.begin() as session:
            metadata.delete_collection(session, collection_id=doomed_ids[0])
        with sessions.begin() as session:  # the highest ids were just deleted: they must not come back
            fresh = metadata.create_collection(session, name="fresh")
            fresh_image, _ = metadata.add_image(
                session, collection_id=fresh.id, source="c.png", sha256="c" * 64, bytes=1
            )
            assert fresh.id > doomed_ids[0]
            assert fresh_image.id > doomed_ids[1]
    finally:
        engine.dispose()


def test_a_finished_shard_is_not_reopened_by_a_late_failure(session):
    """A failure after the shard's work was recorded (e.g. queueing its follow-up job) keeps the result."""
    job = metadata.create_job(session, kind=JobKind.INGEST, shards=[["a"]])
    [shard] = job.shards
    metadata.start_shard(session, shard_id=shard.id)
    metadata.finish_shard(session, shard_id=shard.id, done=1, failed=0)
    metadata.fail_shard(session, shard_id=shard.id, error="broker down", max_attempts=3)
    assert (shard.status, shard.done, shard.error) == (ShardStatus.DONE, 1, None)
    session.rollback()


def test_delete_collection_removes_its_points_whatever_the_rows_say(index):  # noqa: F811
    rng = np.random.default_rng(0)
    index.ensure_collection(encoder_version=VERSION, dimension=DIMENSION)
    points = [
        VectorPoint(image_id=i, attribute_id=1, collection_id=i % 2, vector=rng.standard_normal(DIMENSION))
        for i in range(6)
    ]
    index.upsert(encoder_version=VERSION, points=points)
    index.delete_collection(encoder_version=VERSION, collection_id=0)
    assert index.count(encoder_version=VERSION, collection_id=0) == 0
    assert index.count(encoder_version=VERSION, collection_id=1) == 3
    index.delete_collection(encoder_version="never-indexed", collection_id=0)  # nothing to delete: no error


def test_payloads_are_fetched_by_point_id(index):  # noqa: F811
    index.ensure_collection(encoder_version=VERSION, dimension=DIMENSION)
    point = VectorPoint(
        image_id=7, attribute_id=2, collection_id=1, vector=np.ones(DIMENSION), payload={"sha256": "ab"}
    )
    index.upsert(encoder_version=VERSION, points=[point])
    stored = str(point_id(image_id=7, attribute_id=2, encoder_version=VERSION))
    missing = str(point_id(image_id=8, attribute_id=2, encoder_version=VERSION))
    payloads = index.fetch_payloads(encoder_version=VERSION, point_ids=[stored, missing])
    assert list(payloads) == [stored]
    assert payloads[stored]["sha256"] == "ab"
    assert payloads[stored]["image_id"] == 7
    assert index.fetch_payloads(encoder_version="never-indexed", point_ids=[stored]) == {}
