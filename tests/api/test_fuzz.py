"""A bounded schemathesis run against the OpenAPI schema, schema-valid and schema-violating requests (the CLI's
`--mode all`), in both profiles' stores: whatever the input, never a 500. `bench/fuzz.py` is the longer run."""

from __future__ import annotations

import json
import os

import pytest
import redis
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from api.app import create_app
from api.usecases.context import build_services
from omniattr.testing import create_throwaway_postgres, drop_throwaway_postgres
from store import metadata
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
            with services.session_factory.begin() as session:
                attribute = metadata.get_or_create_attribute(session, text="lighting")
                metadata.set_collection_attribute(
                    session,
                    collection_id=collection["id"],
                    attribute_id=attribute.id,
                    encoder_model_id=services.encoder_model_id,
                    status="ready",
                )
    yield app
    services.close()
    if database_url is not None:
        redis.Redis.from_url(NO_WORKER_REDIS_URL).flushdb()
        drop_throwaway_postgres(request.getfixturevalue("postgres_server"), database_url)


def _mutated(value, number, text):  # noqa: ANN001, ANN202
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return number
    if isinstance(value, str):
        return text(value)
    if isinstance(value, dict):
        return {key: _mutated(item, number, text) for key, item in value.items()}
    if isinstance(value, list):
        return [_mutated(item, number, text) for item in value]
    return value


def send_with_mutations(case, client: TestClient):  # noqa: ANN001, ANN201
    """The case, and for a JSON body what Hypothesis never generates: every number NaN / 1e999 (non-standard
    JSON that Python's parser accepts), every string with a NUL byte."""
    responses = [case.call()]
    if isinstance(case.body, dict | list) and case.media_type == "application/json":
        headers = {"Content-Type": "application/json"}
        for number, text in (
            (float("nan"), lambda t: t),
            (float("inf"), lambda t: t),
            (1, lambda t: t + "\x00"),
        ):
            raw = json.dumps(_mutated(case.body, number, text)).replace("Infinity", "1e999")
            responses.append(
                client.request(case.method, case.formatted_path, params=case.query, content=raw, headers=headers)
            )
    return responses


@pytest.mark.slow
def test_no_input_makes_a_server_error(fuzz_app):
    """Every operation, MAX_EXAMPLES generated requests each per mode (schemathesis' pytest plugin does not
    support this pytest version, so the operations are driven with Hypothesis directly); every 500 is collected."""
    api_schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15
    server_errors: list[str] = []
    sent = 0
    client = TestClient(fuzz_app, raise_server_exceptions=False)

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case):
                nonlocal sent
                for response in send_with_mutations(case, client):
                    sent += 1
                    timed_out_query = response.status_code == 504 and case.operation.path == "/api/search/upload"
                    if response.status_code >= 500 and not timed_out_query:  # 504: no worker in the server profile
                        server_errors.append(f"{case.method} {case.formatted_path}: {response.text[:300]}")

            try:
                call()
            except Unsatisfiable:  # an operation with nothing to violate (no parameters, no body)
                assert mode is GenerationMode.NEGATIVE, operation.label
    assert sent >= len(operations) * 2
    assert server_errors == []
