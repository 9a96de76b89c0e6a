"""The Celery app and its thin tasks (an entry point: it reads settings).

Run a worker with `celery -A indexer.celery_app worker -Q ingest,encode,query,generate`.
Tasks take ids, call the shard bodies in `indexer.work`, and are acknowledged only after they finish
(acks_late), so a worker killed mid-shard leaves the message to be delivered again.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence

from celery import Celery, Task
from kombu import Queue

from indexer import work
from indexer.context import build_worker_context
from omniattr.settings import Settings

log = logging.getLogger(__name__)

QUEUES = ("ingest", "encode", "query", "generate")
TASK_QUEUES = {
    "omniattr.ingest_shard": "ingest",
    "omniattr.index_shard": "encode",
    "omniattr.encode_query": "query",
    "omniattr.generate_shard": "generate",
}
TASK_BY_KIND = {
    "ingest": "omniattr.ingest_shard",
    "index": "omniattr.index_shard",
    "generate": "omniattr.generate_shard",
}


def create_celery_app(settings: Settings) -> Celery:
    """A Celery app wired from settings; in the embedded profile it needs no broker (tasks run in-process)."""
    broker = settings.broker_url or "memory://"
    app = Celery(
        "omniattr", broker=broker, backend=settings.result_backend_url or settings.broker_url or "cache+memory://"
    )
    app.conf.update(
        task_acks_late=True,  # acknowledge after the work, not before
        task_reject_on_worker_lost=True,  # a killed worker's task goes back to the queue
        worker_prefetch_multiplier=1,  # a worker holds one shard at a time
        task_queues=[Queue(name) for name in QUEUES],
        task_routes={name: {"queue": queue} for name, queue in TASK_QUEUES.items()},
        task_serializer="json",
        accept_content=["json"],
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.task_visibility_timeout_s,
            "unacked_restore_interval": max(1, min(10, settings.task_visibility_timeout_s // 2)),
            "unacked_restore_throttle": 1,
        },
        worker_hijack_root_logger=False,
    )
    return app


settings = Settings()
app = create_celery_app(settings)
_context: work.WorkerContext | None = None


def worker_context() -> work.WorkerContext:
    """The per-process context (database, vectors, encoder loaded once), built on first use."""
    global _context
    if _context is None:
        _context = build_worker_context(settings)
    return _context


class CeleryDispatcher:
    """Sends shard ids to the queues; the server profile's seam for API and follow-up work."""

    def __init__(self, celery_app: Celery = app):
        self.app = celery_app

    def submit(self, kind: str, shard_ids: Sequence[int]) -> None:
        task = TASK_BY_KIND[kind]
        for shard_id in shard_ids:
            self.app.send_task(task, args=[shard_id], queue=TASK_QUEUES[task])

    def encode_query(self, *, image_bytes: bytes, attribute: str, timeout: float) -> list[float]:
        """Encode a query image on the `query` queue and wait for the vector."""
        payload = base64.b64encode(image_bytes).decode()
        result = self.app.send_task("omniattr.encode_query", args=[payload, attribute], queue="query")
        return result.get(timeout=timeout)


def _run_shard(task: Task, kind: str, shard_id: int) -> str:
    try:
        return work.run_shard(worker_context(), kind, shard_id, CeleryDispatcher(task.app))
    except work.TRANSIENT_ERRORS as error:
        work.fail_shard_attempt(worker_context(), shard_id, error, retryable=True)
        raise task.retry(
            exc=error, countdown=min(60, 2**task.request.retries), max_retries=work.MAX_SHARD_ATTEMPTS
        ) from error
    except Exception as error:
        work.fail_shard_attempt(worker_context(), shard_id, error, retryable=False)  # a bug or bad data: no retry
        raise


@app.task(name="omniattr.ingest_shard", bind=True)
def ingest_shard(self: Task, shard_id: int) -> str:
    """Ingest one shard of files."""
    return _run_shard(self, "ingest", shard_id)


@app.task(name="omniattr.index_shard", bind=True)
def index_shard(self: Task, shard_id: int) -> str:
    """Encode one shard of images under its job's attributes."""
    return _run_shard(self, "index", shard_id)


@app.task(name="omniattr.generate_shard", bind=True)
def generate_shard(self: Task, shard_id: int) -> str:
    """Render one personalize / compose request."""
    return _run_shard(self, "generate", shard_id)


@app.task(name="omniattr.encode_query")
def encode_query(image_base64: str, attribute: str) -> list[float]:
    """Encode an uploaded query image under one attribute."""
    return work.encode_query(worker_context(), image_bytes=base64.b64decode(image_base64), attribute=attribute)
