"""Bad input answers 4xx JSON with a message, never a 500: non-finite JSON numbers, NUL bytes in paths and
texts (also on PostgreSQL), a non-image query upload in the server profile (real Celery worker on Redis)."""

from __future__ import annotations

import os
import time

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from indexer.tasks import CeleryDispatcher, create_celery_app
from omniattr.settings import Settings
from omniattr.testing import create_throwaway_postgres, drop_throwaway_postgres, mark_attribute_indexed
from store.database import upgrade_database
from tests.api.conftest import make_settings, png
from tests.indexer.test_worker_resume import REDIS_URL, broker, start_worker  # noqa: F401 - broker: a fixture

# A Redis database no worker consumes (REDIS_URL's is shared with the worker tests, which may run meanwhile).
NO_WORKER_REDIS_URL = REDIS_URL.rsplit("/", 1)[0] + "/11"


@pytest.mark.parametrize(
    "body",
    [
        '{"name": NaN}',
        '{"name": Infinity}',
        '{"name": -Infinity}',
        '{"name": 1e999}',
        '{"collection_id": 1, "terms": [{"image_id": 1, "attribute": "lighting", "weight": NaN}]}',
        '{"collection_id": 1, "terms": [{"image_id": 1, "attribute": "lighting", "weight": 1e999}]}',
    ],
)
def test_non_finite_json_numbers_answer_422_json(client, body):
    path = "/api/search" if "terms" in body else "/api/collections"
    response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"]


def test_nul_byte_in_an_ingest_path_is_a_400_with_a_message(client, tmp_path):
    collection = client.post("/api/collections", json={"name": "nul"}).json()
    path = str(tmp_path / "photos" / "a\x00b")
    response = client.post(f"/api/collections/{collection['id']}/ingest", json={"path": path})
    assert response.status_code == 400
    assert "NUL" in response.json()["detail"]


@pytest.fixture
def postgres_client(tmp_path, tiny_encoder_dir, postgres_server):
    url = create_throwaway_postgres(postgres_server)
    upgrade_database(url)
    settings = make_settings(tmp_path, tiny_encoder_dir, database_url=url)
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
            yield test_client
    finally:
        drop_throwaway_postgres(postgres_server, url)


def test_nul_in_names_texts_and_file_names_on_postgresql_is_a_4xx(postgres_client):
    client = postgres_client
    assert client.post("/api/collections", json={"name": "a\x00b"}).status_code in (400, 422)
    described = client.post("/api/collections", json={"name": "d", "description": "x\x00y"})
    assert described.status_code in (400, 422), described.text
    collection = client.post("/api/collections", json={"name": "ok"}).json()
    attributes = client.post(f"/api/collections/{collection['id']}/attributes", json={"attributes": ["li\x00ght"]})
    assert attributes.status_code in (400, 422), attributes.text
    upload = client.post(
        f"/api/collections/{collection['id']}/images", files=[("files", ("a\x00.png", png(0), "image/png"))]
    )
    assert upload.status_code < 500, upload.text
    for response in (described, attributes):
        assert response.json()["detail"]


def test_a_query_no_worker_encodes_in_time_is_a_timeout_not_a_celery_error():
    """Celery's own TimeoutError is no builtin TimeoutError: it was a 500 instead of the 504 the API maps."""
    dispatcher = CeleryDispatcher(create_celery_app(Settings(_env_file=None, broker_url=NO_WORKER_REDIS_URL)))
    with pytest.raises(TimeoutError, match="within 0.5 s"):
        dispatcher.encode_query(image_bytes=png(0), attribute="lighting", timeout=0.5)


@pytest.mark.slow
def test_non_image_query_upload_in_the_server_profile_is_a_400(
    tmp_path,
    tiny_encoder_dir,
    postgres_server,
    broker,  # noqa: F811
):
    """The query is encoded by a real Celery worker (its own process, the `query` queue) through Redis."""
    url = create_throwaway_postgres(postgres_server)
    upgrade_database(url)
    settings = make_settings(tmp_path / "api", tiny_encoder_dir, database_url=url, broker_url=broker)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIATTR_")}
    env.update(
        OMNIATTR_DATABASE_URL=url,
        OMNIATTR_BROKER_URL=broker,
        OMNIATTR_DATA_DIR=str(tmp_path / "worker"),  # its own: the API holds its data directory's lock
        OMNIATTR_ENCODER_PATH=str(tiny_encoder_dir),
        OMNIATTR_DEVICE="cpu",
    )
    worker = start_worker(env, tmp_path / "worker.log", queues="query")
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            collection = client.post("/api/collections", json={"name": "server"}).json()
            client.post(
                f"/api/collections/{collection['id']}/images", files=[("files", ("0.png", png(0), "image/png"))]
            )
            services = client.app.state.services
            mark_attribute_indexed(services, collection["id"], "lighting")  # vectors are not needed here
            form = {"collection_id": str(collection["id"]), "attribute": "lighting"}
            deadline = time.monotonic() + 90
            while True:  # a real image first: the worker is up once it answers (504: not yet)
                good = client.post("/api/search/upload", data=form, files={"image": ("q.png", png(1), "image/png")})
                if good.status_code != 504 or time.monotonic() > deadline:
                    break
            # encoded and searched: the API's own vector index is empty here, which is a 404 saying so
            assert good.status_code in (200, 404), good.text + (tmp_path / "worker.log").read_text()[-3000:]
            assert good.status_code == 200 or "no vectors exist" in good.json()["detail"]
            bad = client.post("/api/search/upload", data=form, files={"image": ("q.png", b"not an image", "image/png")})
            assert bad.status_code == 400, bad.text
            assert "cannot be used" in bad.json()["detail"]
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        drop_throwaway_postgres(postgres_server, url)
