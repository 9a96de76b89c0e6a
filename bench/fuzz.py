"""Longer schemathesis fuzzing of the API in both profiles' stores: how many requests, how many 500s.

    python bench/fuzz.py [--examples 300] [--profiles embedded,server] [--record]

Like `schemathesis run --mode all`: for every operation of the OpenAPI schema, `--examples` schema-valid and
`--examples` schema-violating requests (Hypothesis, derandomised), sent in-process through the ASGI app; each
JSON body is also sent with every number NaN, with every number 1e999, and with a NUL byte in every string.
Every 5xx except the 504 of a query nobody encoded in time is counted and its first lines printed.

- embedded: SQLite + Qdrant Edge + the in-process worker, a collection of 3 images indexed under "lighting".
- server: PostgreSQL (a throwaway database on OMNIATTR_TEST_POSTGRES_URL) + the Celery dispatcher on Redis
  (OMNIATTR_FUZZ_REDIS_URL, db 11 by default, flushed: no worker may consume it), no worker: queued shards
  wait, "lighting" is marked indexed by hand, and a query image times out after 1 s (a 504, expected).
  Vectors: Qdrant Edge (no Qdrant server is needed for what the API does with them here).

The encoder is the shipped starter (models/starter/encoder) unless --encoder names another.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

POSTGRES_ADMIN_URL = os.environ.get(
    "OMNIATTR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("OMNIATTR_FUZZ_REDIS_URL", "redis://127.0.0.1:6379/11")  # a db no worker consumes


def png(seed: int, size: int = 48) -> bytes:
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def build_app(profile: str, data_dir: Path, encoder: Path | None):
    """The app with its services and a seeded collection; returns (app, services, cleanup)."""
    import redis
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.usecases.context import build_services
    from omniattr.settings import Settings
    from omniattr.testing import create_throwaway_postgres, drop_throwaway_postgres, mark_attribute_indexed
    from store.database import upgrade_database

    values = dict(data_dir=data_dir, device="cpu", allowed_roots=[data_dir], index_batch_size=8)
    if encoder is not None:
        values["encoder_path"] = encoder
    database_url = None
    if profile == "server":
        database_url = create_throwaway_postgres(POSTGRES_ADMIN_URL)
        redis.Redis.from_url(REDIS_URL).flushdb()
        values.update(database_url=database_url, broker_url=REDIS_URL, query_timeout_s=1.0)
    settings = Settings(_env_file=None, **values)
    upgrade_database(settings.resolved_database_url)
    services = build_services(settings)
    app = create_app(settings, services=services)
    with TestClient(app) as client:
        collection = client.post("/api/collections", json={"name": "fuzz"}).json()
        client.post(
            f"/api/collections/{collection['id']}/images",
            files=[("files", (f"{i}.png", png(i), "image/png")) for i in range(3)],
        )
        if profile == "embedded":
            client.post(f"/api/collections/{collection['id']}/attributes", json={"attributes": ["lighting"]})
            services.dispatcher.join()
        else:
            mark_attribute_indexed(services, collection["id"], "lighting")

    def cleanup() -> None:
        services.close()
        if database_url is not None:
            redis.Redis.from_url(REDIS_URL).flushdb()
            drop_throwaway_postgres(POSTGRES_ADMIN_URL, database_url)

    return app, cleanup


def main() -> int:
    from omniattr.testing import fuzz_app

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=300, help="requests per operation and mode (bound)")
    parser.add_argument("--profiles", default="embedded,server")
    parser.add_argument("--encoder", type=Path, help="encoder checkpoint (default: the shipped starter)")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    rows = []
    for profile in args.profiles.split(","):
        with tempfile.TemporaryDirectory(prefix=f"omniattr-fuzz-{profile}-") as tmp:
            app, cleanup = build_app(profile, Path(tmp), args.encoder)
            started = time.perf_counter()
            try:
                report = fuzz_app(app, args.examples)
            finally:
                cleanup()
            seconds = time.perf_counter() - started
        errors = report.server_errors
        print(
            f"{profile}: {report.operations} operations, {report.sent} requests sent, {len(errors)} x 500 "
            f"in {seconds:.0f} s"
        )
        for error in errors[:20]:
            print("   ", error)
        rows.append((profile, report.operations, report.sent, len(errors), seconds))
    table = ["| profile | operations | requests | 500s | seconds |", "|---|---:|---:|---:|---:|"]
    table += [f"| {p} | {o} | {s} | {e} | {t:.0f} |" for p, o, s, e, t in rows]
    print("\n".join(table))
    if args.record:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        with (ROOT / "bench" / "RESULTS.md").open("a") as results:
            results.write(
                f"\n`python bench/fuzz.py --examples {args.examples}` ({stamp}):\n\n" + "\n".join(table) + "\n"
            )
    return 1 if any(row[3] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
