"""The handles an API process works with (`Services`), built from settings by the app factory, and the helpers
every use case shares."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from indexer.context import Dispatcher, PlannedJob
from indexer.ingest import MediaStore
from indexer.models import EncoderInfo
from indexer.work import register_encoder
from store import metadata
from store.database import make_session_factory, sqlite_file
from store.diskspace import DiskReserve
from store.errors import ServiceUnavailableError
from store.vectors import VectorIndex

if TYPE_CHECKING:
    from omniattr.settings import Settings


class IndexStateCache:
    """Per collection, the attributes indexed under this process's encoder: text -> (attribute id, status).

    Search reads it on every request; entries live `ttl` seconds. A miss or a non-ready status is always
    re-read from the database before it becomes an error, so a job that just finished is seen at once.
    """

    def __init__(self, ttl: float = 2.0):
        self.ttl = ttl
        self._entries: dict[int, tuple[float, dict[str, tuple[int, str]]]] = {}
        self._lock = threading.Lock()

    def get(
        self, session: Session, *, collection_id: int, encoder_model_id: int, fresh: bool = False
    ) -> dict[str, tuple[int, str]]:
        """The collection's attribute states, from the cache unless stale or `fresh` is asked for."""
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(collection_id)
        if entry is not None and not fresh and now - entry[0] < self.ttl:
            return entry[1]
        rows = metadata.list_collection_attributes(
            session, collection_id=collection_id, encoder_model_id=encoder_model_id
        )
        state = {row.attribute.text: (row.attribute_id, row.status) for row in rows}
        with self._lock:
            self._entries[collection_id] = (now, state)
        return state


@dataclass
class Services:
    """The handles one API process works with."""

    session_factory: sessionmaker[Session]
    read_session_factory: sessionmaker[Session]  # queries only: never waits for writers
    vectors: VectorIndex
    media: MediaStore
    dispatcher: Dispatcher  # InProcessDispatcher (embedded) or CeleryDispatcher (server)
    encoder_info: EncoderInfo
    allowed_roots: list[Path] = field(default_factory=list)
    query_timeout_s: float = 30.0
    api_keys_required: bool = False
    closers: list[Callable[[], None]] = field(default_factory=list)
    encoder_model_id: int = 0  # this encoder's row id, registered at start-up
    generator_plugin: str | None = None  # None: no generator configured, generations are refused
    index_state: IndexStateCache = field(default_factory=IndexStateCache)
    database_disk: DiskReserve | None = None  # the SQLite file's disk; None for a database server (its own disk)

    def close(self) -> None:
        """Stop the in-process worker (if any) and close the vector index."""
        for closer in reversed(self.closers):
            closer()


def build_services(settings: Settings) -> Services:
    """Open everything an API process needs, per profile: in-process worker when embedded, Celery when not."""
    from indexer.context import build_worker_context

    context = build_worker_context(settings)
    closers: list[Callable[[], None]] = [context.vectors.close]
    if context.lock is not None:
        closers.insert(0, context.lock.close)
    dispatcher: Dispatcher
    if settings.broker_url:
        from indexer.tasks import CeleryDispatcher, create_celery_app

        dispatcher = CeleryDispatcher(create_celery_app(settings))
    else:
        from indexer.dispatch import InProcessDispatcher

        in_process = InProcessDispatcher(context, wedged_after_s=settings.stale_shard_timeout_s)
        closers.append(in_process.close)
        dispatcher = in_process
    with context.session_factory.begin() as session:
        encoder_model_id = register_encoder(session, context.encoder_info).id
    from indexer.dispatch import StaleWorkSweeper

    # Re-sends what no live worker holds and indexes images a crash left without vectors (issue 16).
    sweeper = StaleWorkSweeper(
        context,
        dispatcher,
        stale_after_s=settings.stale_shard_timeout_s,
        interval_s=settings.stale_sweep_interval_s,
        resume_all_at_start=not settings.broker_url,  # embedded: this process owns every shard
    )
    sweeper.start()
    closers.append(sweeper.close)
    return Services(
        encoder_model_id=encoder_model_id,
        # The worker context's generator (Settings.resolved_generator_path), so the API and the worker agree.
        generator_plugin=settings.generator_plugin if context.generator is not None else None,
        session_factory=context.session_factory,
        read_session_factory=make_session_factory(context.session_factory.kw["bind"], read_only=True),
        vectors=context.vectors,
        media=context.media,
        dispatcher=dispatcher,
        encoder_info=context.encoder_info,
        allowed_roots=list(settings.allowed_roots),
        query_timeout_s=settings.query_timeout_s,
        api_keys_required=settings.api_keys_required,
        closers=closers,
        database_disk=_database_disk(settings),
    )


def _database_disk(settings: Settings) -> DiskReserve | None:
    path = sqlite_file(settings.resolved_database_url)
    if path is None:
        return None
    return DiskReserve(path.parent, settings.disk_reserve_mb * 1024 * 1024, "the metadata database in")


def ensure_database_space(services: Services) -> None:
    """InsufficientStorageError (507) when the SQLite file's disk is down to the reserve; called before the use
    cases that commit rows by the batch (upload, ingest, planning an index job), where a failed commit on a full
    disk would stop them half way."""
    if services.database_disk is not None:
        services.database_disk.ensure_free()


def encoder_model_id(session: Session, services: Services) -> int:
    """This process's encoder row id (registered at start-up; looked up when `services` was built by hand)."""
    if services.encoder_model_id:
        return services.encoder_model_id
    return metadata.get_encoder_model(session, version=services.encoder_info.version).id


def dispatch(services: Services, plan: PlannedJob | None) -> None:
    """Send a committed plan's shards to the workers; ServiceUnavailableError (naming the job) if the queue is
    down: the job stays committed, not yet queued, and the stale-job sweeper sends it once the queue is back."""
    if plan is not None and plan.shard_ids:
        try:
            services.dispatcher.submit(plan.kind, plan.shard_ids)
        except ServiceUnavailableError as error:
            raise ServiceUnavailableError(
                f"job {plan.job_id} is saved but not yet queued: {error}. It is queued automatically once the "
                f"queue is back, or retry the request (or POST /api/jobs/{plan.job_id}/resume) in a minute."
            ) from error
