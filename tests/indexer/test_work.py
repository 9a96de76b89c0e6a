"""Ingest, indexing, backfill and query encoding through the in-process worker, on PostgreSQL and SQLite."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.dispatch import InProcessDispatcher
from indexer.models import describe_encoder
from indexer.queries import encode_query
from indexer.work import (
    plan_index_attributes,
    plan_ingest_directory,
    register_encoder,
    resume_job,
)
from store import metadata
from store.errors import InvalidInputError, NotFoundError
from store.vectors import point_id
from tests.indexer.conftest import write_images


def run_planned(dispatcher, plan):
    """Commit the plan (done by the caller's `with`), then dispatch and wait, as the API does."""
    dispatcher.submit(plan.kind, plan.shard_ids)
    dispatcher.join()


@pytest.fixture
def dispatcher(worker_context):
    dispatcher = InProcessDispatcher(worker_context)
    yield dispatcher
    dispatcher.close()


def setup_collection(context, tmp_path, count=10):
    write_images(tmp_path / "photos", count)
    with context.session_factory.begin() as session:
        collection = metadata.create_collection(session, name="c")
        encoder_model = register_encoder(session, context.encoder_info)
        return collection.id, encoder_model.id


@pytest.mark.slow
def test_ingest_then_index_then_backfill_then_new_images(worker_context, dispatcher, tmp_path):
    context = worker_context
    collection_id, encoder_model_id = setup_collection(context, tmp_path, count=10)
    version = context.encoder_info.version

    with context.session_factory.begin() as session:
        ingest = plan_ingest_directory(
            session,
            collection_id=collection_id,
            directory=tmp_path / "photos",
            allowed_roots=context.allowed_roots,
            shard_size=4,
        )
    run_planned(dispatcher, ingest)
    with context.session_factory() as session:
        progress = metadata.job_progress(session, job_id=ingest.job_id)
        assert (progress.status, progress.done, progress.total, progress.shards_total) == ("done", 10, 10, 3)

    with context.session_factory.begin() as session:
        index = plan_index_attributes(
            session,
            collection_id=collection_id,
            attribute_texts=["Lighting", "art style"],
            encoder_model_id=encoder_model_id,
            shard_size=4,
        )
    run_planned(dispatcher, index)
    assert context.vectors.count(encoder_version=version, collection_id=collection_id) == 20
    with context.session_factory() as session:
        progress = metadata.job_progress(session, job_id=index.job_id)
        assert (progress.status, progress.done, progress.total) == ("done", 20, 20)
        assert progress.rate > 0
        states = metadata.list_collection_attributes(session, collection_id=collection_id)
        assert sorted((s.attribute.text, s.status) for s in states) == [("art style", "ready"), ("lighting", "ready")]

    # Already-indexed attributes plan nothing; a new one backfills only itself.
    with context.session_factory.begin() as session:
        assert (
            plan_index_attributes(
                session, collection_id=collection_id, attribute_texts=["lighting"], encoder_model_id=encoder_model_id
            )
            is None
        )
        backfill = plan_index_attributes(
            session,
            collection_id=collection_id,
            attribute_texts=["lighting", "background"],
            encoder_model_id=encoder_model_id,
        )
        assert metadata.get_job(session, job_id=backfill.job_id).total == 10  # 10 images x 1 new attribute
    run_planned(dispatcher, backfill)
    assert context.vectors.count(encoder_version=version, collection_id=collection_id) == 30

    # New images are indexed under every attribute already indexed, without being asked.
    write_images(tmp_path / "photos", 3, start=100)
    with context.session_factory.begin() as session:
        more = plan_ingest_directory(
            session, collection_id=collection_id, directory=tmp_path / "photos", allowed_roots=context.allowed_roots
        )
    run_planned(dispatcher, more)
    assert context.vectors.count(encoder_version=version, collection_id=collection_id) == 13 * 3
    with context.session_factory() as session:
        assert metadata.count_images(session, collection_id=collection_id) == 13  # the 10 old ones deduplicated


@pytest.mark.slow
def test_indexed_vectors_match_the_encoder_and_queries(worker_context, dispatcher, tmp_path):
    context = worker_context
    collection_id, encoder_model_id = setup_collection(context, tmp_path, count=4)
    with context.session_factory.begin() as session:
        ingest = plan_ingest_directory(
            session, collection_id=collection_id, directory=tmp_path / "photos", allowed_roots=context.allowed_roots
        )
    run_planned(dispatcher, ingest)
    with context.session_factory.begin() as session:
        index = plan_index_attributes(
            session, collection_id=collection_id, attribute_texts=["lighting"], encoder_model_id=encoder_model_id
        )
    run_planned(dispatcher, index)
    version = context.encoder_info.version
    with context.session_factory() as session:
        image = metadata.list_images(session, collection_id=collection_id, limit=1)[0]
        lighting = metadata.find_attribute(session, text="lighting")
    data = (tmp_path / "photos" / "img0000.png").read_bytes()
    query = np.asarray(encode_query(context, image_bytes=data, attribute="  LIGHTING "))
    np.testing.assert_allclose(
        dispatcher.encode_query(image_bytes=data, attribute="lighting", timeout=30), query, atol=1e-6
    )
    stored = context.vectors.fetch(
        encoder_version=version,
        point_ids=[point_id(image_id=image.id, attribute_id=lighting.id, encoder_version=version)],
    )
    (vector,) = stored.values()
    np.testing.assert_allclose(vector, query, atol=1e-5)
    hits = context.vectors.search(
        encoder_version=version, vector=query, collection_id=collection_id, attribute_id=lighting.id, limit=1
    )
    assert hits[0].image_id == image.id and hits[0].score == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_deleted_images_are_skipped_and_bad_files_fail_alone(worker_context, dispatcher, tmp_path):
    context = worker_context
    collection_id, encoder_model_id = setup_collection(context, tmp_path, count=5)
    (tmp_path / "photos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with context.session_factory.begin() as session:
        ingest = plan_ingest_directory(
            session, collection_id=collection_id, directory=tmp_path / "photos", allowed_roots=context.allowed_roots
        )
    run_planned(dispatcher, ingest)
    with context.session_factory.begin() as session:
        job = metadata.get_job(session, job_id=ingest.job_id)
        assert (job.done, job.failed) == (5, 1)
        assert "broken.png" in job.shards[0].error
        index = plan_index_attributes(
            session, collection_id=collection_id, attribute_texts=["pose"], encoder_model_id=encoder_model_id
        )
        doomed = metadata.list_images(session, collection_id=collection_id, status="ready", limit=1)[0].id
    with context.session_factory.begin() as session:  # deleted after planning, before the worker runs
        metadata.delete_image(session, image_id=doomed)
    run_planned(dispatcher, index)
    with context.session_factory() as session:
        progress = metadata.job_progress(session, job_id=index.job_id)
    assert (progress.status, progress.done, progress.total) == ("done", 5, 5)
    assert context.vectors.count(encoder_version=context.encoder_info.version, collection_id=collection_id) == 4


def test_bad_requests_are_refused_and_write_nothing(worker_context, tmp_path):
    context = worker_context
    collection_id, encoder_model_id = setup_collection(context, tmp_path, count=1)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with context.session_factory() as session:
        with pytest.raises(InvalidInputError, match="outside the allowed roots"):
            plan_ingest_directory(
                session, collection_id=collection_id, directory=outside, allowed_roots=context.allowed_roots
            )
        with pytest.raises(InvalidInputError, match="attribute text is empty"):
            plan_index_attributes(
                session,
                collection_id=collection_id,
                attribute_texts=["lighting", "  "],
                encoder_model_id=encoder_model_id,
            )
        with pytest.raises(InvalidInputError, match="limit is 200"):
            plan_index_attributes(
                session, collection_id=collection_id, attribute_texts=["x" * 300], encoder_model_id=encoder_model_id
            )
        with pytest.raises(NotFoundError):
            plan_index_attributes(
                session, collection_id=99999, attribute_texts=["lighting"], encoder_model_id=encoder_model_id
            )
        session.rollback()
        assert metadata.list_jobs(session) == []
        assert metadata.find_attribute(session, text="lighting") is None


def test_resume_lists_only_unfinished_shards(worker_context, tmp_path):
    context = worker_context
    collection_id, encoder_model_id = setup_collection(context, tmp_path, count=6)
    with context.session_factory.begin() as session:
        plan = plan_ingest_directory(
            session,
            collection_id=collection_id,
            directory=tmp_path / "photos",
            allowed_roots=context.allowed_roots,
            shard_size=2,
        )
    from indexer.work import run_ingest_shard

    run_ingest_shard(context, plan.shard_ids[0])
    with context.session_factory() as session:
        assert resume_job(session, job_id=plan.job_id).shard_ids == plan.shard_ids[1:]


def test_encoder_description_matches_the_loaded_model(tiny_encoder_dir):
    from encoder import AttributeEncoder

    info = describe_encoder(tiny_encoder_dir)
    model = AttributeEncoder.from_pretrained(tiny_encoder_dir)
    assert (info.version, info.dimension, info.backend) == (model.version, model.dimension, "mllm")
    with pytest.raises(InvalidInputError, match="not an encoder checkpoint"):
        describe_encoder(tiny_encoder_dir.parent)


@pytest.mark.slow
def test_concurrent_queries_are_batched_and_a_bad_one_fails_alone(worker_context, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from indexer.dispatch import QueryBatcher

    context = worker_context
    paths = write_images(tmp_path / "q", 6)
    expected = [encode_query(context, image_bytes=p.read_bytes(), attribute="lighting") for p in paths]
    batcher = QueryBatcher(context, max_batch=4, workers=2)  # two batches can be in flight at once
    calls = []
    original = context.encoder.get().encode
    context.encoder.get().encode = lambda images, texts: calls.append(len(images)) or original(images, texts)
    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(lambda p=p: batcher.submit(p.read_bytes(), "lighting").result(30)) for p in paths]
            bad = batcher.submit(b"not an image", "lighting")
            results = [f.result() for f in futures]
        with pytest.raises(InvalidInputError, match="query image cannot be used"):
            bad.result(30)
    finally:
        del context.encoder.get().encode
        batcher.close()
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert sum(calls) == 6 and max(calls) <= 4
    assert not any(thread.is_alive() for thread in batcher._threads)  # close stopped both workers
    with pytest.raises(ValueError, match="at least one worker"):
        QueryBatcher(context, workers=0)


def test_a_generation_whose_base_image_was_deleted_fails_with_that_reason(worker_context, tmp_path):
    """Apply to my image: the base is re-read by the worker; deleted meanwhile, the generation says so."""
    from indexer.generate import Reference, plan_generation, run_generate_shard
    from indexer.work import run_ingest_shard

    context = worker_context
    collection_id, _ = setup_collection(context, tmp_path, count=2)
    with context.session_factory.begin() as session:
        ingest = plan_ingest_directory(
            session, collection_id=collection_id, directory=tmp_path / "photos", allowed_roots=context.allowed_roots
        )
    for shard_id in ingest.shard_ids:
        run_ingest_shard(context, shard_id)
    with context.session_factory.begin() as session:
        reference_id, base_id = metadata.list_image_ids(session, collection_id=collection_id)
        plan, generation_id = plan_generation(
            session, references=[Reference(reference_id, "pose")], prompt="a cup", base_image_id=base_id
        )
        assert metadata.get_generation(session, generation_id=generation_id).request["strength"] == 0.6
        metadata.delete_image(session, image_id=base_id)
    assert run_generate_shard(context, plan.shard_ids[0]) == "failed"
    with context.session_factory() as session:
        generation = metadata.get_generation(session, generation_id=generation_id)
        assert (generation.status, generation.error) == ("failed", f"the base image {base_id} was deleted")


def test_resume_dispatches_each_job_kind_to_its_own_shard_body(worker_context, tmp_path):
    from indexer.generate import Reference, plan_generation

    context = worker_context
    collection_id, encoder_model_id = setup_collection(context, tmp_path, count=2)
    with context.session_factory.begin() as session:
        ingest = plan_ingest_directory(
            session, collection_id=collection_id, directory=tmp_path / "photos", allowed_roots=context.allowed_roots
        )
    from indexer.work import run_ingest_shard

    for shard_id in ingest.shard_ids:
        run_ingest_shard(context, shard_id)
    with context.session_factory.begin() as session:
        index = plan_index_attributes(
            session, collection_id=collection_id, attribute_texts=["pose"], encoder_model_id=encoder_model_id
        )
        image_id = metadata.list_image_ids(session, collection_id=collection_id)[0]
        generation, _ = plan_generation(session, references=[Reference(image_id, "pose")], prompt="a cup")
    with context.session_factory() as session:
        resumed = {plan.job_id: resume_job(session, job_id=plan.job_id) for plan in (index, generation)}
    assert resumed[index.job_id].kind == "index" and resumed[index.job_id].shard_ids == index.shard_ids
    assert resumed[generation.job_id].kind == "generate"
    assert resumed[generation.job_id].shard_ids == generation.shard_ids
