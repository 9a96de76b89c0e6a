"""Issue 16 in the indexer, on PostgreSQL and SQLite: the in-process worker outlives any failing shard, a point
is tied to the image content it encodes, and stale shards are dispatched again."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

import indexer.runner
from indexer.dispatch import InProcessDispatcher
from indexer.work import _images_missing_vectors, plan_index_attributes, plan_ingest_directory, register_encoder
from omniattr.domain import JobStatus
from store import metadata
from store.tables import JobShard, utcnow
from store.vectors import VectorPoint
from tests.indexer.conftest import write_images


@pytest.fixture
def dispatcher(worker_context):
    dispatcher = InProcessDispatcher(worker_context)
    yield dispatcher
    dispatcher.close()


def ingested_collection(context, dispatcher, directory, name, count, start=0):
    """A collection of `count` ready images (ingested through the worker) and this encoder's model id."""
    write_images(directory, count, start=start)
    with context.session_factory.begin() as session:
        collection_id = metadata.create_collection(session, name=name).id
        encoder_model_id = register_encoder(session, context.encoder_info).id
        ingest = plan_ingest_directory(
            session, collection_id=collection_id, directory=directory, allowed_roots=[directory.parent]
        )
    dispatcher.submit(ingest.kind, ingest.shard_ids)
    dispatcher.join()
    return collection_id, encoder_model_id


def plan_index(context, collection_id, encoder_model_id, attributes=("lighting",)):
    with context.session_factory.begin() as session:
        return plan_index_attributes(
            session, collection_id=collection_id, attribute_texts=list(attributes), encoder_model_id=encoder_model_id
        )


def job_status(context, job_id, timeout=60.0):
    """The job's status once it is over, or its open status after `timeout` (the worker never ran it)."""
    deadline = time.monotonic() + timeout
    while True:
        with context.session_factory() as session:
            status = metadata.get_job(session, job_id=job_id).status
        if status not in (JobStatus.PENDING, JobStatus.RUNNING) or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["collection deleted mid-shard", "database fails on commit"])
def test_the_worker_thread_outlives_a_failing_shard(worker_context, dispatcher, tmp_path, monkeypatch, fault):
    """Either fault made `fail_shard_attempt` raise inside the worker's except, which ended the thread: every
    later job stayed pending."""
    context = worker_context
    doomed, model_id = ingested_collection(context, dispatcher, tmp_path / "photos" / "a", "doomed", 3)
    survivor, _ = ingested_collection(context, dispatcher, tmp_path / "photos" / "b", "survivor", 3, start=10)
    real_write = indexer.runner.write_vectors
    real_finish, real_fail = metadata.finish_shard, metadata.fail_shard

    def write_then_fault(*args, **kwargs):
        written = real_write(*args, **kwargs)
        if fault == "collection deleted mid-shard":
            with context.session_factory.begin() as session:
                metadata.delete_collection(session, collection_id=doomed)
        else:  # a full disk: every commit of the shard's result and of its failure fails
            monkeypatch.setattr(metadata, "finish_shard", failing)
            monkeypatch.setattr(metadata, "fail_shard", failing)
        return written

    def failing(*_args, **_kwargs):
        raise OperationalError("COMMIT", {}, Exception("database or disk is full"))

    monkeypatch.setattr(indexer.runner, "write_vectors", write_then_fault)
    first = plan_index(context, doomed, model_id)
    dispatcher.submit(first.kind, first.shard_ids)
    dispatcher.join()
    monkeypatch.setattr(indexer.runner, "write_vectors", real_write)
    monkeypatch.setattr(metadata, "finish_shard", real_finish)
    monkeypatch.setattr(metadata, "fail_shard", real_fail)

    second = plan_index(context, survivor, model_id)
    dispatcher.submit(second.kind, second.shard_ids)
    assert job_status(context, second.job_id) == JobStatus.DONE
    assert dispatcher.problem() is None
    version = context.encoder_info.version
    assert context.vectors.count(encoder_version=version, collection_id=survivor) == 3
    if fault == "collection deleted mid-shard":  # the shard saw its images gone and removed what it wrote
        assert context.vectors.count(encoder_version=version, collection_id=doomed) == 0


@pytest.mark.slow
def test_a_point_encoding_other_content_counts_as_missing(worker_context, dispatcher, tmp_path):
    """A point id only names (image id, attribute, encoder): the payload's sha256 says which content it encodes."""
    context = worker_context
    collection_id, model_id = ingested_collection(context, dispatcher, tmp_path / "photos" / "a", "c", 2)
    plan = plan_index(context, collection_id, model_id)
    dispatcher.submit(plan.kind, plan.shard_ids)
    dispatcher.join()
    with context.session_factory() as session:
        image_ids = metadata.list_image_ids(session, collection_id=collection_id)
        [attribute] = metadata.list_collection_attributes(session, collection_id=collection_id)
    assert _images_missing_vectors(context, image_ids, collection_id) == []
    stale = image_ids[0]  # its point now holds another image's vector, as a reused id left it
    context.vectors.upsert(
        encoder_version=context.encoder_info.version,
        points=[
            VectorPoint(
                image_id=stale,
                attribute_id=attribute.attribute_id,
                collection_id=collection_id,
                vector=[1.0] * context.encoder_info.dimension,
                payload={"sha256": "0" * 64},
            )
        ],
    )
    assert _images_missing_vectors(context, image_ids, collection_id) == [stale]


@pytest.mark.slow
def test_the_sweeper_dispatches_stale_shards_only(worker_context, dispatcher, tmp_path):
    """A job committed but never queued (the broker was down) runs once its shards are older than the timeout."""
    from indexer.dispatch import StaleWorkSweeper

    context = worker_context
    collection_id, model_id = ingested_collection(context, dispatcher, tmp_path / "photos" / "a", "c", 2)
    stale = plan_index(context, collection_id, model_id, ["lighting"])
    fresh = plan_index(context, collection_id, model_id, ["art style"])
    with context.session_factory.begin() as session:
        session.execute(
            update(JobShard).where(JobShard.job_id == stale.job_id).values(updated_at=utcnow() - timedelta(seconds=120))
        )
    sweeper = StaleWorkSweeper(context, dispatcher, stale_after_s=60, interval_s=3600, resume_all_at_start=False)
    plans = sweeper.sweep_stale(older_than_s=sweeper.stale_after_s)
    assert [plan.job_id for plan in plans] == [stale.job_id]
    assert job_status(context, stale.job_id) == JobStatus.DONE
    assert job_status(context, fresh.job_id, timeout=0) == JobStatus.PENDING
    assert sweeper.sweep_stale(older_than_s=sweeper.stale_after_s) == []  # the fresh one is not stale yet
