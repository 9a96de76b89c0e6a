"""What the tests and the benchmarks share (neither imports the other): throwaway PostgreSQL databases, and the
schemathesis fuzz driver of tests/api/test_fuzz.py and bench/fuzz.py.

Not used by the product: an import-linter contract keeps every product package off it.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url


def mark_attribute_indexed(services: Any, collection_id: int, text: str) -> None:
    """Record `text` as indexed ("ready") for a collection without computing vectors: for checks where no worker
    runs (the server profile in-process) and the vectors themselves are not what is tested."""
    from store import metadata

    with services.session_factory.begin() as session:
        attribute = metadata.get_or_create_attribute(session, text=text)
        metadata.set_collection_attribute(
            session,
            collection_id=collection_id,
            attribute_id=attribute.id,
            encoder_model_id=services.encoder_model_id,
            status="ready",
        )


def create_throwaway_postgres(admin_url: str) -> str:
    """Create an empty database with a unique name on the server at `admin_url` and return its URL."""
    name = f"omniattr_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_throwaway_postgres(admin_url: str, url: str) -> None:
    """Drop a database made by create_throwaway_postgres, closing its leftover connections."""
    name = make_url(url).database
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
            {"name": name},
        )
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    engine.dispose()


def _mutated(value: Any, number: float, text: Any) -> Any:
    """`value` (a JSON body) with every number replaced by `number` and every string passed through `text`."""
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


def send_with_mutations(case: Any, client: Any) -> list[Any]:
    """The case, and for a JSON body what Hypothesis never generates: every number NaN / 1e999 (non-standard
    JSON that Python's parser accepts), every string with a NUL byte."""
    responses = [case.call()]
    if isinstance(case.body, dict | list) and case.media_type == "application/json":
        headers = {"Content-Type": "application/json"}
        for number, text in ((float("nan"), lambda t: t), (float("inf"), lambda t: t), (1, lambda t: t + "\x00")):
            raw = json.dumps(_mutated(case.body, number, text)).replace("Infinity", "1e999")
            responses.append(
                client.request(case.method, case.formatted_path, params=case.query, content=raw, headers=headers)
            )
    return responses


@dataclass
class FuzzReport:
    """What a fuzz run sent and which responses were server errors."""

    operations: int = 0
    sent: int = 0
    server_errors: list[str] = field(default_factory=list)
    unsatisfiable: list[str] = field(default_factory=list)  # "METHOD path (mode)" with nothing to generate


def fuzz_app(app: Any, examples: int) -> FuzzReport:
    """Every operation of the app's OpenAPI schema, `examples` generated requests each in both schemathesis modes
    (valid and schema-violating, like `schemathesis run --mode all`), derandomised, in-process; every 500 (an
    unhandled error) is collected. 503 / 504 / 507 are answers: e.g. health and query encoding with no worker.
    (schemathesis' pytest plugin does not support this pytest version, so Hypothesis drives the operations.)"""
    import schemathesis
    from fastapi.testclient import TestClient
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    client = TestClient(app, raise_server_exceptions=False)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    report = FuzzReport(operations=len(operations))
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=examples,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case: Any) -> None:
                for response in send_with_mutations(case, client):
                    report.sent += 1
                    if response.status_code == 500:  # unhandled; a 503/504/507 is a fault the API names
                        report.server_errors.append(
                            f"{response.status_code} {case.method} {case.formatted_path}: {response.text[:300]}"
                        )

            try:
                call()
            except Unsatisfiable:  # an operation with nothing to violate (no parameters, no body)
                report.unsatisfiable.append(f"{operation.label} ({mode.value})")
    with contextlib.suppress(Exception):
        client.close()
    return report
