"""The Celery app factory, its thin tasks and the Celery dispatcher (the server profile's seam).

`create_celery_app(settings)` is called by entry points only: `indexer.celery_app` (the module that
`celery -A indexer.celery_app worker` imports) and the API's `build_services`. Tasks take ids, call the shard
bodies in `indexer.work`, and are acknowledged only after they finish (acks_late), so a worker killed
mid-shard leaves the message to be delivered again.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from celery import Celery, Task
from celery.exceptions import TimeoutError as CeleryTimeoutError
from kombu import Queue
from kombu.exceptions import OperationalError as KombuOperationalError

from indexer import queries, work
from indexer.context import WorkerContext, build_worker_context
from omniattr.domain import ShardKind
from store.errors import ServiceUnavailableError

if TYPE_CHECKING:
    from omniattr.settings import Settings

HEALTH_TIMEOUT_S = 1.0  # /api/health waits this long for the broker and for a worker's ping
QUEUES = ("ingest", "encode", "query", "generate")
ENCODE_QUERY_TASK = "omniattr.encode_query"
TASK_BY_KIND: dict[ShardKind, str] = {
    ShardKind.INGEST: "omniattr.ingest_shard",
    ShardKind.INDEX: "omniattr.index_shard",
    ShardKind.GENERATE: "omniattr.generate_shard",
}
TASK_QUEUES = {
    TASK_BY_KIND[ShardKind.INGEST]: "ingest",
    TASK_BY_KIND[ShardKind.INDEX]: "encode",
    ENCODE_QUERY_TASK: "query",
    TASK_BY_KIND[ShardKind.GENERATE]: "generate",
}


class WorkerContextOnce:
    """A worker process's context, built from settings on first use (after the pool has forked), then kept."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._context: WorkerContext | None = None
        self._lock = threading.Lock()

    def get(self) -> WorkerContext:
        """The context: database, vectors, and the encoder loaded once per process."""
        with self._lock:
            if self._context is None:
                self._context = build_worker_context(self.settings)
            return self._context


def create_celery_app(settings: Settings) -> Celery:
    """A Celery app wired from settings, with the omniattr tasks registered; in the embedded profile it needs
    no broker (tasks run in-process)."""
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
    _register_tasks(app, WorkerContextOnce(settings))
    return app


def _register_tasks(app: Celery, context: WorkerContextOnce) -> None:
    """Define the tasks on `app` alone (shared=False: another app built by the factory gets its own)."""

    def run_shard(task: Task, kind: ShardKind, shard_id: int) -> str:
        try:
            return work.run_shard(context.get(), kind, shard_id, CeleryDispatcher(task.app))
        except work.TRANSIENT_ERRORS as error:
            work.fail_shard_attempt(context.get(), shard_id, error, retryable=True)
            raise task.retry(
                exc=error, countdown=min(60, 2**task.request.retries), max_retries=work.MAX_SHARD_ATTEMPTS
            ) from error
        except Exception as error:
            work.fail_shard_attempt(context.get(), shard_id, error, retryable=False)  # a bug or bad data: no retry
            raise

    @app.task(name=TASK_BY_KIND[ShardKind.INGEST], bind=True, shared=False)
    def ingest_shard(self: Task, shard_id: int) -> str:
        """Ingest one shard of files."""
        return run_shard(self, ShardKind.INGEST, shard_id)

    @app.task(name=TASK_BY_KIND[ShardKind.INDEX], bind=True, shared=False)
    def index_shard(self: Task, shard_id: int) -> str:
        """Encode one shard of images under its job's attributes."""
        return run_shard(self, ShardKind.INDEX, shard_id)

    @app.task(name=TASK_BY_KIND[ShardKind.GENERATE], bind=True, shared=False)
    def generate_shard(self: Task, shard_id: int) -> str:
        """Render one personalize / compose request."""
        return run_shard(self, ShardKind.GENERATE, shard_id)

    @app.task(name=ENCODE_QUERY_TASK, shared=False)
    def encode_query(image_base64: str, attribute: str) -> list[float]:
        """Encode an uploaded query image under one attribute."""
        return queries.encode_query(context.get(), image_bytes=base64.b64decode(image_base64), attribute=attribute)


class CeleryDispatcher:
    """Sends shard ids and query images to the queues: the server profile's `indexer.context.Dispatcher`."""

    def __init__(self, celery_app: Celery):
        self.app = celery_app

    def submit(self, kind: ShardKind, shard_ids: Sequence[int]) -> None:
        """Send each shard to its task's queue; call after the transaction that created them has committed.

        ServiceUnavailableError when the broker cannot be reached (after kombu's own short retries).
        """
        task = TASK_BY_KIND[kind]
        try:
            for shard_id in shard_ids:
                # No result: progress lives in the database, and a result subscription would retry a down
                # broker for 20 s before failing.
                self.app.send_task(task, args=[shard_id], queue=TASK_QUEUES[task], ignore_result=True)
        except (KombuOperationalError, OSError) as error:
            raise ServiceUnavailableError(f"the job queue's broker cannot be reached ({error})") from error

    def problem(self) -> str | None:
        """None when the broker answers and at least one worker answers a ping, else which of them does not."""
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=HEALTH_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - any failure to connect is the answer
            return f"the job queue's broker cannot be reached: {error}"
        if not self.app.control.ping(timeout=HEALTH_TIMEOUT_S):
            return f"no Celery worker answered a ping within {HEALTH_TIMEOUT_S} s; jobs wait until one runs"
        return None

    def encode_query(self, *, image_bytes: bytes, attribute: str, timeout: float) -> list[float]:
        """Encode a query image on the `query` queue and wait for the vector."""
        payload = base64.b64encode(image_bytes).decode()
        result = self.app.send_task(ENCODE_QUERY_TASK, args=[payload, attribute], queue=TASK_QUEUES[ENCODE_QUERY_TASK])
        try:
            return result.get(timeout=timeout)  # a worker's InvalidInputError comes back as itself (a 400)
        except CeleryTimeoutError:
            raise TimeoutError(f"no worker encoded the query image within {timeout:g} s") from None
