"""Metadata functions against migrated PostgreSQL and SQLite databases."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest

from store import metadata
from store.errors import ConflictError, InvalidInputError, NotFoundError
from store.tables import utcnow


def sha(data: str) -> str:
    return hashlib.sha256(data.encode()).hexdigest()


def add(session, collection_id: int, name: str, **kwargs):
    return metadata.add_image(
        session, collection_id=collection_id, source=f"/photos/{name}.jpg", sha256=sha(name), bytes=100, **kwargs
    )


@pytest.mark.slow
def test_collections_create_find_list_and_conflict(session):
    first = metadata.create_collection(session, name="  holiday   photos ", description="2024")
    assert first.name == "holiday photos"
    assert metadata.find_collection(session, name="holiday photos").id == first.id
    with pytest.raises(ConflictError, match="already exists"):
        metadata.create_collection(session, name="holiday photos")
    with pytest.raises(InvalidInputError, match="empty"):
        metadata.create_collection(session, name="   ")
    metadata.create_collection(session, name="art")
    assert [c.name for c in metadata.list_collections(session)] == ["holiday photos", "art"]
    with pytest.raises(NotFoundError, match="collection 999999 does not exist"):
        metadata.get_collection(session, collection_id=999999)


def test_image_dedup_by_content_within_a_collection(session):
    one = metadata.create_collection(session, name="one")
    two = metadata.create_collection(session, name="two")
    image, created = add(session, one.id, "cat", width=10, height=20, format="JPEG", status="ready")
    again, created_again = metadata.add_image(
        session, collection_id=one.id, source="/elsewhere/copy.jpg", sha256=sha("cat"), bytes=100
    )
    assert created and not created_again and again.id == image.id
    assert again.source == "/photos/cat.jpg"  # the first copy is kept
    _, created_other = add(session, two.id, "cat")
    assert created_other  # the same file may live in another collection
    assert metadata.count_images(session, collection_id=one.id) == 1
    with pytest.raises(InvalidInputError, match="64 lowercase hex"):
        metadata.add_image(session, collection_id=one.id, source="x", sha256="abc", bytes=1)
    with pytest.raises(NotFoundError):
        add(session, 424242, "dog")


def test_image_status_pagination_and_lookup(session):
    collection = metadata.create_collection(session, name="c")
    ids = [add(session, collection.id, f"img{i}")[0].id for i in range(5)]
    metadata.set_image_status(session, image_id=ids[1], status="failed", error="truncated JPEG")
    for image_id in ids[2:]:
        metadata.set_image_status(session, image_id=image_id, status="ready", width=64, height=48, format="PNG")
    page = metadata.list_images(session, collection_id=collection.id, limit=2)
    assert [i.id for i in page] == ids[:2]
    page2 = metadata.list_images(session, collection_id=collection.id, after_id=page[-1].id, limit=2)
    assert [i.id for i in page2] == ids[2:4]
    assert metadata.list_image_ids(session, collection_id=collection.id) == ids[2:]
    failed = metadata.get_image(session, image_id=ids[1])
    assert (failed.status, failed.error) == ("failed", "truncated JPEG")
    assert metadata.get_image(session, image_id=ids[2]).width == 64
    assert metadata.count_images(session, collection_id=collection.id, status="ready") == 3
    with pytest.raises(InvalidInputError, match="not one of"):
        metadata.set_image_status(session, image_id=ids[0], status="weird")
    metadata.delete_image(session, image_id=ids[0])
    assert set(metadata.get_images(session, image_ids=ids)) == set(ids[1:])


def test_deleting_a_collection_cascades_to_images_and_jobs(session):
    collection = metadata.create_collection(session, name="doomed")
    image, _ = add(session, collection.id, "a")
    job = metadata.create_job(session, kind="index", collection_id=collection.id, shards=[[image.id]])
    image_id, job_id = image.id, job.id
    metadata.delete_collection(session, collection_id=collection.id)
    session.expire_all()
    assert metadata.get_images(session, image_ids=[image_id]) == {}
    with pytest.raises(NotFoundError):
        metadata.get_job(session, job_id=job_id)


def test_attributes_are_normalised_and_unique(session):
    a = metadata.get_or_create_attribute(session, text="  Art   Style ")
    b = metadata.get_or_create_attribute(session, text="art style")
    assert a.id == b.id and a.text == "art style"
    assert metadata.find_attribute(session, text="ART STYLE").id == a.id
    assert metadata.find_attribute(session, text="lighting") is None
    with pytest.raises(InvalidInputError, match="empty"):
        metadata.get_or_create_attribute(session, text=" \t\n")
    with pytest.raises(InvalidInputError, match="limit is 200"):
        metadata.get_or_create_attribute(session, text="x" * 201)


def test_encoder_registration_is_idempotent_and_guards_versions(session):
    kwargs = dict(
        name="compact", version="compact-abc123", backend="compact", dimension=256, checkpoint_sha256=sha("weights")
    )
    first = metadata.register_encoder_model(session, **kwargs)
    assert metadata.register_encoder_model(session, **kwargs).id == first.id
    with pytest.raises(ConflictError, match="new version string"):
        metadata.register_encoder_model(session, **{**kwargs, "dimension": 512})
    assert metadata.get_encoder_model(session, version="compact-abc123").dimension == 256
    with pytest.raises(NotFoundError, match="not registered"):
        metadata.get_encoder_model(session, version="nope")


def test_collection_attribute_state(session):
    collection = metadata.create_collection(session, name="c")
    model = metadata.register_encoder_model(
        session, name="m", version="v1", backend="compact", dimension=8, checkpoint_sha256=sha("m")
    )
    lighting = metadata.get_or_create_attribute(session, text="lighting")
    metadata.set_collection_attribute(
        session, collection_id=collection.id, attribute_id=lighting.id, encoder_model_id=model.id, status="indexing"
    )
    row = metadata.set_collection_attribute(
        session, collection_id=collection.id, attribute_id=lighting.id, encoder_model_id=model.id, status="ready"
    )
    rows = metadata.list_collection_attributes(session, collection_id=collection.id, status="ready")
    assert [(r.id, r.attribute.text) for r in rows] == [(row.id, "lighting")]


def test_job_shards_progress_and_completion(session):
    collection = metadata.create_collection(session, name="c")
    job = metadata.create_job(
        session,
        kind="index",
        collection_id=collection.id,
        params={"attributes": [1, 2]},
        shards=[[1, 2, 3], [4, 5], [6]],
        units_per_item=2,
    )
    assert (job.status, job.total, [s.total for s in job.shards]) == ("pending", 12, [6, 4, 2])
    first, second, third = job.shards
    assert metadata.start_shard(session, shard_id=first.id).attempts == 1
    assert metadata.get_job(session, job_id=job.id).status == "running"
    metadata.finish_shard(session, shard_id=first.id, done=6, failed=0)
    assert metadata.start_shard(session, shard_id=first.id) is None  # a redelivered finished shard is skipped

    # A worker dies mid-shard: the shard stays running and is what a resume picks up.
    metadata.start_shard(session, shard_id=second.id)
    assert [s.id for s in metadata.unfinished_shards(session, job_id=job.id)] == [second.id, third.id]

    progress = metadata.job_progress(session, job_id=job.id, now=job.started_at + timedelta(seconds=3))
    assert (progress.done, progress.total, progress.shards_done, progress.shards_total) == (6, 12, 1, 3)
    assert progress.rate == pytest.approx(2.0, rel=0.01)
    assert progress.eta_seconds == pytest.approx(3.0, rel=0.01)

    assert metadata.fail_shard(session, shard_id=second.id, error="OOM", max_attempts=3).status == "pending"
    metadata.start_shard(session, shard_id=second.id)
    metadata.finish_shard(session, shard_id=second.id, done=3, failed=1, error="1 image unreadable")
    metadata.start_shard(session, shard_id=third.id)
    finished = metadata.finish_shard(session, shard_id=third.id, done=2, failed=0)
    assert (finished.status, finished.done, finished.failed) == ("done", 11, 1)
    assert finished.finished_at is not None
    assert metadata.job_progress(session, job_id=job.id).eta_seconds == 0.0


def test_shard_that_keeps_failing_fails_the_job(session):
    job = metadata.create_job(session, kind="ingest", shards=[[1, 2]])
    shard = job.shards[0]
    for _ in range(2):
        metadata.start_shard(session, shard_id=shard.id)
        shard = metadata.fail_shard(session, shard_id=shard.id, error="broker lost", max_attempts=2)
    assert shard.status == "failed" and shard.failed == 2
    failed_job = metadata.get_job(session, job_id=job.id)
    assert failed_job.status == "failed" and "1 of 1 shards failed" in failed_job.error


def test_cancelled_job_skips_its_shards_and_empty_job_is_done(session):
    job = metadata.create_job(session, kind="index", shards=[[1]])
    metadata.cancel_job(session, job_id=job.id)
    assert metadata.start_shard(session, shard_id=job.shards[0].id) is None
    assert metadata.create_job(session, kind="index", shards=[]).status == "done"


def test_generations_record_output_and_scores(session):
    generation = metadata.create_generation(session, request={"prompt": "a cat", "refs": [[1, "lighting", 1.0]]})
    assert generation.status == "pending"
    metadata.finish_generation(
        session, generation_id=generation.id, output_path="gen/1.png", transfer_scores={"lighting": 0.81}
    )
    session.commit()
    session.expire_all()
    stored = metadata.get_generation(session, generation_id=generation.id)
    assert (stored.status, stored.transfer_scores, stored.request["prompt"]) == ("done", {"lighting": 0.81}, "a cat")
    failed = metadata.create_generation(session, request={})
    assert metadata.fail_generation(session, generation_id=failed.id, error="no refs").status == "failed"


def test_api_keys_are_stored_hashed_and_can_be_revoked(session):
    key, plaintext = metadata.create_api_key(session, name="ci")
    assert plaintext.startswith("oa_") and plaintext not in (key.key_hash, key.prefix)
    assert key.key_hash == hashlib.sha256(plaintext.encode()).hexdigest()
    assert metadata.verify_api_key(session, plaintext=plaintext).id == key.id
    assert metadata.verify_api_key(session, plaintext=plaintext + "x") is None
    metadata.revoke_api_key(session, key_id=key.id)
    assert metadata.verify_api_key(session, plaintext=plaintext) is None
    assert [k.name for k in metadata.list_api_keys(session)] == ["ci"]


def test_timestamps_are_set(session):
    before = utcnow() - timedelta(seconds=5)
    collection = metadata.create_collection(session, name="t")
    session.commit()
    session.expire_all()
    created = metadata.get_collection(session, collection_id=collection.id).created_at
    if created.tzinfo is None:  # SQLite hands back naive UTC
        before = before.replace(tzinfo=None)
    assert created >= before


def test_rollback_undoes_rows_written_through_savepoints(session):
    """Regression: on SQLite, releasing a SAVEPOINT used to commit the whole transaction."""
    collection = metadata.create_collection(session, name="kept?")
    metadata.get_or_create_attribute(session, text="lighting")  # uses a savepoint
    add(session, collection.id, "x")  # uses a savepoint
    session.rollback()
    assert metadata.find_attribute(session, text="lighting") is None
    assert metadata.find_collection(session, name="kept?") is None


def test_sqlite_readers_do_not_wait_for_a_writer(tmp_path):
    """Read-only sessions take no lock (deferred BEGIN on WAL) and see the last committed state."""
    import time

    from store.database import make_engine, make_session_factory, upgrade_database

    url = f"sqlite:///{tmp_path / 'locks.sqlite3'}"
    upgrade_database(url)
    engine = make_engine(url)
    writer = make_engine(url)
    try:
        with make_session_factory(engine).begin() as session:
            metadata.create_collection(session, name="before")
        with make_session_factory(writer).begin() as holding:  # holds the write lock until the block ends
            metadata.create_collection(holding, name="uncommitted")
            started = time.perf_counter()
            with make_session_factory(engine, read_only=True)() as reader:
                names = [c.name for c in metadata.list_collections(reader)]
            assert names == ["before"] and time.perf_counter() - started < 1.0
    finally:
        engine.dispose()
        writer.dispose()
