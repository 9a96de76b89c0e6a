"""A bounded schemathesis run against the OpenAPI schema: whatever the input, never a 500."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from api.app import create_app
from api.usecases.context import build_services
from store.database import upgrade_database
from tests.api.conftest import make_settings, png

MAX_EXAMPLES = int(os.environ.get("OMNIATTR_FUZZ_EXAMPLES", "12"))


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory, tiny_encoder_dir):
    tmp_path = tmp_path_factory.mktemp("fuzz")
    app_settings = make_settings(tmp_path, tiny_encoder_dir)
    upgrade_database(app_settings.resolved_database_url)
    services = build_services(app_settings)
    app = create_app(app_settings, services=services)
    from fastapi.testclient import TestClient

    with TestClient(app) as client:  # a collection with indexed images, so ids and attributes can hit
        collection = client.post("/api/collections", json={"name": "fuzz"}).json()
        client.post(
            f"/api/collections/{collection['id']}/images",
            files=[("files", (f"{i}.png", png(i), "image/png")) for i in range(3)],
        )
        job = client.post(f"/api/collections/{collection['id']}/attributes", json={"attributes": ["lighting"]})
        services.dispatcher.join()
        assert client.get(f"/api/jobs/{job.json()['job']['id']}").json()["status"] == "done"
    yield app
    services.close()


@pytest.mark.slow
def test_no_input_makes_a_server_error(fuzz_app):
    """Every operation, MAX_EXAMPLES generated requests each (schemathesis' pytest plugin does not support
    this pytest version, so the operations are driven with Hypothesis directly)."""
    api_schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15

    for operation in operations:

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def call(case):
            case.call_and_validate(checks=[not_a_server_error])

        call()
