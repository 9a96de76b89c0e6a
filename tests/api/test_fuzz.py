"""A bounded schemathesis run against the OpenAPI schema, schema-valid and schema-violating requests (the CLI's
`--mode all`), in both profiles' stores: whatever the input, never a 500. `bench/fuzz.py` is the longer run."""

from __future__ import annotations

import os

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.usecases.context import build_services
from omniattr import testing as omniattr_testing
from omniattr.testing import create_throwaway_postgres, drop_throwaway_postgres, mark_attribute_indexed
from store.database import upgrade_database
from tests.api.conftest import make_settings, png
from tests.api.test_bad_input import NO_WORKER_REDIS_URL

MAX_EXAMPLES = int(os.environ.get("OMNIATTR_FUZZ_EXAMPLES", "12"))


@pytest.fixture(scope="module", params=["embedded", "server"])
def fuzz_app(request, tmp_path_factory, tiny_encoder_dir):
    """embedded: SQLite + Qdrant Edge + in-process worker; server: PostgreSQL + the Celery dispatcher on Redis
    (no worker runs: queued shards wait, and a query image times out after 1 s as a 504)."""
    tmp_path = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    overrides, database_url = {}, None
    if request.param == "server":
        admin_url = request.getfixturevalue("postgres_server")
        database_url = create_throwaway_postgres(admin_url)
        broker = redis.Redis.from_url(NO_WORKER_REDIS_URL)
        broker.ping()
        broker.flushdb()
        overrides = dict(database_url=database_url, broker_url=NO_WORKER_REDIS_URL, query_timeout_s=1.0)
    app_settings = make_settings(tmp_path, tiny_encoder_dir, **overrides)
    upgrade_database(app_settings.resolved_database_url)
    services = build_services(app_settings)
    app = create_app(app_settings, services=services)
    with TestClient(app) as client:  # a collection with indexed images, so ids and attributes can hit
        collection = client.post("/api/collections", json={"name": "fuzz"}).json()
        client.post(
            f"/api/collections/{collection['id']}/images",
            files=[("files", (f"{i}.png", png(i), "image/png")) for i in range(3)],
        )
        if request.param == "embedded":
            job = client.post(f"/api/collections/{collection['id']}/attributes", json={"attributes": ["lighting"]})
            services.dispatcher.join()
            assert client.get(f"/api/jobs/{job.json()['job']['id']}").json()["status"] == "done"
        else:  # marked indexed by hand: no worker runs here
            mark_attribute_indexed(services, collection["id"], "lighting")
    yield app
    services.close()
    if database_url is not None:
        redis.Redis.from_url(NO_WORKER_REDIS_URL).flushdb()
        drop_throwaway_postgres(request.getfixturevalue("postgres_server"), database_url)


@pytest.mark.slow
def test_no_input_makes_a_server_error(fuzz_app):
    """Every operation, MAX_EXAMPLES generated requests each per mode (plus NaN / 1e999 / NUL variants of JSON
    bodies); every 500 is collected."""
    report = omniattr_testing.fuzz_app(fuzz_app, MAX_EXAMPLES)
    assert report.operations >= 15
    assert all("negative" in label for label in report.unsatisfiable), report.unsatisfiable
    assert report.sent >= report.operations * 2
    assert report.server_errors == []
