"""A real Celery worker on the real Redis broker and PostgreSQL is SIGKILLed mid-shard and restarted:
the job completes with every (image, attribute) indexed exactly once and no shard lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from indexer.ingest import MediaStore, ingest_path
from indexer.models import describe_encoder
from indexer.tasks import CeleryDispatcher, create_celery_app
from indexer.work import plan_index_attributes, register_encoder
from omniattr.settings import Settings
from omniattr.testing import create_throwaway_postgres, drop_throwaway_postgres
from store import metadata
from store.database import make_engine, make_session_factory, upgrade_database
from store.vectors import QdrantEdgeIndex, point_id
from tests.indexer.conftest import write_images

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("OMNIATTR_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
VISIBILITY_TIMEOUT_S = 3
IMAGES, ATTRIBUTES = 40, ["lighting", "art style"]


@pytest.fixture
def broker():
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}; start it (.ci/run does) or set OMNIATTR_TEST_REDIS_URL")
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


@pytest.fixture
def database(postgres_server):
    url = create_throwaway_postgres(postgres_server)
    upgrade_database(url)
    yield url
    drop_throwaway_postgres(postgres_server, url)


def start_worker(env: dict[str, str], log_path: Path, queues: str = "ingest,encode") -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "indexer.celery_app",
        "worker",
        "--pool=solo",
        "-Q",
        queues,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--loglevel=INFO",
    ]
    log = log_path.open("ab")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def shard_states(session_factory, job_id: int) -> list[tuple[int, str, int]]:
    with session_factory() as session:
        job = metadata.get_job(session, job_id=job_id)
        return [(shard.id, shard.status, shard.attempts) for shard in job.shards]


@pytest.mark.slow
def test_sigkilled_worker_resumes_and_indexes_everything_once(database, broker, tmp_path, tiny_encoder_dir):
    data_dir, photos = tmp_path / "data", tmp_path / "photos"
    paths = write_images(photos, IMAGES)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIATTR_")}
    env.update(
        OMNIATTR_DATABASE_URL=database,
        OMNIATTR_BROKER_URL=broker,
        OMNIATTR_DATA_DIR=str(data_dir),
        OMNIATTR_ENCODER_PATH=str(tiny_encoder_dir),
        OMNIATTR_DEVICE="cpu",
        OMNIATTR_INDEX_BATCH_SIZE="2",
        OMNIATTR_TASK_VISIBILITY_TIMEOUT_S=str(VISIBILITY_TIMEOUT_S),
        OMNIATTR_ALLOWED_ROOTS=f'["{photos}"]',
    )
    engine = make_engine(database)
    session_factory = make_session_factory(engine)
    info = describe_encoder(tiny_encoder_dir)
    media = MediaStore(data_dir / "media")
    with session_factory.begin() as session:
        collection = metadata.create_collection(session, name="resume")
        for path in paths:
            ingest_path(session, media, collection_id=collection.id, path=path, allowed_roots=[photos])
        encoder_model = register_encoder(session, info)
        plan = plan_index_attributes(
            session,
            collection_id=collection.id,
            attribute_texts=ATTRIBUTES,
            encoder_model_id=encoder_model.id,
            shard_size=8,
        )
    settings = Settings(broker_url=broker, database_url=database, task_visibility_timeout_s=VISIBILITY_TIMEOUT_S)
    dispatcher = CeleryDispatcher(create_celery_app(settings))
    dispatcher.submit(plan.kind, plan.shard_ids)

    log_path = tmp_path / "worker.log"
    worker = start_worker(env, log_path)
    killed_shard = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and killed_shard is None:
            states = shard_states(session_factory, plan.job_id)
            running = [shard_id for shard_id, status, _ in states if status == "running"]
            if running and any(status == "done" for _, status, _ in states):
                os.killpg(worker.pid, signal.SIGKILL)  # mid-shard: no chance to ack or clean up
                worker.wait(timeout=30)
                killed_shard = running[0]
            time.sleep(0.005)
        assert killed_shard is not None, "the worker never got to a second shard:\n" + log_path.read_text()[-3000:]
        states = {
            shard_id: (status, attempts) for shard_id, status, attempts in shard_states(session_factory, plan.job_id)
        }
        assert states[killed_shard] == ("running", 1), "the kill did not land mid-shard"
        assert any(status == "pending" for status, _ in states.values()), "no shard was left for the restart"

        time.sleep(VISIBILITY_TIMEOUT_S + 1)  # the dead worker's unacknowledged message becomes visible again
        worker = start_worker(env, log_path, queues="ingest,encode,query")
        # Generous: on a loaded 2-core machine a shard takes up to ~35 s (CI saw 180 s run out mid-job).
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            with session_factory() as session:
                progress = metadata.job_progress(session, job_id=plan.job_id)
            if progress.status in ("done", "failed"):
                break
            time.sleep(0.2)
        assert progress.status == "done", f"job ended {progress.status}:\n" + log_path.read_text()[-3000:]
        # The same worker answers a query image on the `query` queue.
        query_vector = dispatcher.encode_query(image_bytes=paths[0].read_bytes(), attribute="Lighting", timeout=60)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)

    expected_points = IMAGES * len(ATTRIBUTES)
    assert (progress.done, progress.failed, progress.total) == (expected_points, 0, expected_points)
    final = {shard_id: (status, attempts) for shard_id, status, attempts in shard_states(session_factory, plan.job_id)}
    assert all(status == "done" for status, _ in final.values()), final
    assert final[killed_shard][1] == 2  # the killed shard ran again

    vectors = QdrantEdgeIndex(data_dir / "vectors")
    try:
        assert vectors.count(encoder_version=info.version, collection_id=collection.id) == expected_points
        with session_factory() as session:
            image_ids = metadata.list_image_ids(session, collection_id=collection.id)
            attribute_ids = [metadata.find_attribute(session, text=text).id for text in ATTRIBUTES]
        wanted = [
            str(point_id(image_id=i, attribute_id=a, encoder_version=info.version))
            for i in image_ids
            for a in attribute_ids
        ]
        stored = vectors.fetch(encoder_version=info.version, point_ids=wanted)
        assert set(stored) == set(wanted)
        first = str(point_id(image_id=image_ids[0], attribute_id=attribute_ids[0], encoder_version=info.version))
        assert max(abs(a - b) for a, b in zip(query_vector, stored[first], strict=True)) < 1e-5
    finally:
        vectors.close()
        engine.dispose()
