"""Issue 16, data loss and stuck work, through the real app on the embedded profile (SQLite + Qdrant Edge +
in-process worker) and on the server profile with its broker down (a closed loopback port)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from indexer.ingest import ingest_bytes
from store.database import upgrade_database
from store.vectors import QdrantEdgeIndex
from tests.api.conftest import free_port, make_settings, png, wait_for_job

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(tmp_path, tiny_encoder_dir, monkeypatch):
    for key in [k for k in os.environ if k.startswith("OMNIATTR_")]:
        monkeypatch.delenv(key)
    settings = make_settings(tmp_path, tiny_encoder_dir)
    upgrade_database(settings.resolved_database_url)
    return settings


def upload(client, collection_id, seeds):
    files = [("files", (f"p{s}.png", png(s), "image/png")) for s in seeds]
    report = client.post(f"/api/collections/{collection_id}/images", files=files).json()
    return [r["image_id"] for r in report["results"]]


def vector_count(client, collection_id):
    services = client.app.state.services
    return services.vectors.count(encoder_version=services.encoder_info.version, collection_id=collection_id)


@pytest.mark.slow
def test_ids_are_never_reused_after_a_delete(settings):
    """SQLite reused the highest deleted id, so a new image took a deleted image's vector."""
    with TestClient(create_app(settings)) as client:
        first = client.post("/api/collections", json={"name": "a"}).json()["id"]
        [old_image] = upload(client, first, [1])
        assert client.delete(f"/api/collections/{first}").status_code == 204
        second = client.post("/api/collections", json={"name": "b"}).json()["id"]
        [new_image] = upload(client, second, [2])
    assert second > first
    assert new_image > old_image


@pytest.mark.slow
def test_deleting_a_collection_while_its_index_job_writes_leaves_no_vectors(settings, monkeypatch):
    """The shard writes its vectors after the delete committed: they must not stay behind."""
    import indexer.runner

    about_to_write, deleted = threading.Event(), threading.Event()
    real_write = indexer.runner.write_vectors

    def write_after_the_delete(*args, **kwargs):
        about_to_write.set()
        deleted.wait(30)
        return real_write(*args, **kwargs)

    with TestClient(create_app(settings)) as client:
        collection_id = client.post("/api/collections", json={"name": "a"}).json()["id"]
        upload(client, collection_id, range(4))
        monkeypatch.setattr(indexer.runner, "write_vectors", write_after_the_delete)
        response = client.post(f"/api/collections/{collection_id}/attributes", json={"attributes": ["lighting"]})
        assert response.status_code == 202, response.text
        assert about_to_write.wait(60)
        assert client.delete(f"/api/collections/{collection_id}").status_code == 204
        deleted.set()
        services = client.app.state.services
        services.dispatcher.join()
        assert vector_count(client, collection_id) == 0
        assert services.dispatcher.problem() is None


@pytest.mark.slow
def test_health_reports_a_dead_embedded_worker(settings):
    with TestClient(create_app(settings)) as client:
        assert client.get("/api/health").status_code == 200
        dispatcher = client.app.state.services.dispatcher
        dispatcher._queue.put(None)  # the worker loop's stop signal: the thread ends as if it had died
        dispatcher._thread.join(10)
        response = client.get("/api/health")
        assert response.status_code == 503
        assert "worker thread has stopped" in response.json()["worker"]


@pytest.mark.slow
def test_committed_but_unplanned_images_are_indexed_at_start_up(settings):
    """What SIGKILL during a multi-file upload leaves: images committed one by one, their index job never
    planned (the upload plans it at the end). Simulated by committing images as the upload does per file."""
    with TestClient(create_app(settings)) as client:
        collection_id = client.post("/api/collections", json={"name": "a"}).json()["id"]
        upload(client, collection_id, range(2))
        response = client.post(f"/api/collections/{collection_id}/attributes", json={"attributes": ["lighting"]})
        assert wait_for_job(client, response.json()["job"]["id"])["status"] == "done"
        services = client.app.state.services
        for seed in (10, 11, 12):  # the upload's per-file commits, then the kill
            with services.session_factory.begin() as session:
                ingest_bytes(session, services.media, collection_id=collection_id, source=f"{seed}.png", data=png(seed))
        assert vector_count(client, collection_id) == 2
    with TestClient(create_app(settings)) as client:  # the restart
        deadline = time.monotonic() + 60
        while vector_count(client, collection_id) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert vector_count(client, collection_id) == 5


@pytest.mark.slow
def test_an_unqueued_job_is_resumed_at_embedded_start_up(settings):
    """A job committed but never run (the process died before or while its shards ran) runs after a restart."""
    from indexer.work import plan_index_attributes

    with TestClient(create_app(settings)) as client:
        collection_id = client.post("/api/collections", json={"name": "a"}).json()["id"]
        upload(client, collection_id, range(3))
        services = client.app.state.services
        with services.session_factory.begin() as session:  # planned and committed, never dispatched
            plan = plan_index_attributes(
                session,
                collection_id=collection_id,
                attribute_texts=["lighting"],
                encoder_model_id=services.encoder_model_id,
            )
    with TestClient(create_app(settings)) as client:
        assert wait_for_job(client, plan.job_id, timeout=60)["status"] == "done"
        assert vector_count(client, collection_id) == 3


@pytest.fixture
def broker_down_settings(settings):
    return settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})


@pytest.mark.slow
def test_broker_down_index_answers_503_and_a_repost_is_not_refused(broker_down_settings):
    with TestClient(create_app(broker_down_settings)) as client:
        collection_id = client.post("/api/collections", json={"name": "a"}).json()["id"]
        upload(client, collection_id, range(2))  # no attribute indexed yet: nothing to queue
        response = client.post(f"/api/collections/{collection_id}/attributes", json={"attributes": ["lighting"]})
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == "application/json"
        assert int(response.headers["retry-after"]) > 0
        assert "not yet queued" in response.json()["detail"]
        [job] = client.get("/api/jobs", params={"collection_id": collection_id}).json()["data"]
        assert job["status"] == "pending"  # saved, visible, for the sweeper or a repost
        again = client.post(f"/api/collections/{collection_id}/attributes", json={"attributes": ["lighting"]})
        assert again.status_code == 503, again.text  # retried, not "already being indexed"
        # An upload meanwhile stores its files and answers with them; its index job waits for the sweeper.
        files = [("files", ("late.png", png(7), "image/png"))]
        late = client.post(f"/api/collections/{collection_id}/images", files=files)
        assert late.status_code == 200, late.text
        assert late.json()["index_job_id"] is not None
        health = client.get("/api/health")
        assert health.status_code == 503
        assert "broker" in health.json()["worker"]
        # The broker is back (the real Redis on loopback, a database of its own): a repost queues the saved job.
        from indexer.tasks import CeleryDispatcher, create_celery_app

        up = broker_down_settings.model_copy(update={"broker_url": "redis://127.0.0.1:6379/13"})
        celery_app = create_celery_app(up)
        client.app.state.services.dispatcher = CeleryDispatcher(celery_app)
        try:
            queued = client.post(f"/api/collections/{collection_id}/attributes", json={"attributes": ["lighting"]})
            assert queued.status_code == 202, queued.text
            assert queued.json()["job"]["id"] == job["id"]
        finally:
            celery_app.control.purge()


def start_server(env: dict[str, str], cwd) -> tuple[subprocess.Popen, str]:
    """`omniattr up` of this checkout in its own process on a free loopback port, once its health answers 200."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-P", "-m", "omniattr.cli", "up", "--host", "127.0.0.1", "--port", str(port)],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        with suppress(httpx.HTTPError):
            if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                return process, url
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"omniattr up did not start (exit code {process.poll()})")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()  # uvicorn's graceful shutdown: the worker stops, the vector index flushes
    process.wait(timeout=60)


@pytest.mark.slow
def test_sigkill_during_a_multi_file_upload_loses_no_committed_image(tmp_path, tiny_encoder_dir, monkeypatch):
    """The real fault behind issue 16 item 3: `omniattr up` SIGKILLed while a multi-file upload commits its rows
    one by one, before the request plans their index job, then started again.

    What it guards: every image that committed ends up with its vector after the restart (before the fix, the
    kill left them `ready` with no vector for good: neither a re-upload, a duplicate, nor a re-index repaired
    them), and the kill leaves no `.tmp-*` file in the media directory. The kill is timed by the rows the
    server commits (read from its SQLite file), not by the request body: the route runs only once the whole
    multipart body has arrived, so a slow body would not place the kill among the commits.
    """
    for key in [k for k in os.environ if k.startswith("OMNIATTR_")]:
        monkeypatch.delenv(key)
    data_dir = tmp_path / "data"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMNIATTR_DATA_DIR": str(data_dir),
        "OMNIATTR_ENCODER_PATH": str(tiny_encoder_dir),
        "OMNIATTR_DEVICE": "cpu",
        "OMNIATTR_INDEX_BATCH_SIZE": "8",
    }
    process, url = start_server(env, tmp_path)
    try:
        collection_id = httpx.post(f"{url}/api/collections", json={"name": "killed"}).json()["id"]
        files = [("files", (f"p{s}.png", png(s), "image/png")) for s in range(2)]
        assert httpx.post(f"{url}/api/collections/{collection_id}/images", files=files, timeout=60).status_code == 200
        job = httpx.post(f"{url}/api/collections/{collection_id}/attributes", json={"attributes": ["lighting"]})
        job_id = job.json()["job"]["id"]
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/api/jobs/{job_id}").json()["status"] != "done":
            assert time.monotonic() < deadline, "the first index job did not finish"
            time.sleep(0.1)
        encoder_version = httpx.get(f"{url}/api/health").json()["encoder_version"]

        # The upload: 150 new images (commits one by one, then the index job at the end); SIGKILL after 5 rows.
        uploaded = [("files", (f"u{s}.png", png(s, size=128), "image/png")) for s in range(100, 250)]
        outcome: list[object] = []

        def send() -> None:
            try:
                outcome.append(httpx.post(f"{url}/api/collections/{collection_id}/images", files=uploaded, timeout=120))
            except httpx.HTTPError as error:
                outcome.append(error)

        sender = threading.Thread(target=send)
        sender.start()
        database = sqlite3.connect(f"file:{data_dir / 'omniattr.sqlite3'}?mode=ro", uri=True)
        deadline = time.monotonic() + 120
        while image_rows(database, collection_id) < 2 + 5:
            assert time.monotonic() < deadline and sender.is_alive(), f"no rows committed in time: {outcome}"
            time.sleep(0.002)
        process.kill()
        process.wait(timeout=30)
        sender.join(timeout=60)
        committed = image_rows(database, collection_id)
        database.close()
        assert isinstance(outcome[0], httpx.HTTPError), "the upload finished before the kill"
        assert 2 + 5 <= committed < 2 + len(uploaded), committed  # killed among the per-file commits

        process, url = start_server(env, tmp_path)  # the restart
        deadline = time.monotonic() + 120
        while not all_jobs_done(url, collection_id, at_least=2):
            assert time.monotonic() < deadline, httpx.get(f"{url}/api/jobs").json()
            time.sleep(0.2)
    finally:
        stop_server(process)

    vectors = QdrantEdgeIndex(data_dir / "vectors")
    try:
        assert vectors.count(encoder_version=encoder_version, collection_id=collection_id) == committed
    finally:
        vectors.close()
    assert list((data_dir / "media").rglob(".tmp-*")) == []


def image_rows(database: sqlite3.Connection, collection_id: int) -> int:
    query = "SELECT count(*) FROM images WHERE collection_id = ? AND status = 'ready'"
    return database.execute(query, (collection_id,)).fetchone()[0]


def all_jobs_done(url: str, collection_id: int, *, at_least: int) -> bool:
    jobs = httpx.get(f"{url}/api/jobs", params={"collection_id": collection_id}).json()["data"]
    return len(jobs) >= at_least and all(job["status"] == "done" for job in jobs)
