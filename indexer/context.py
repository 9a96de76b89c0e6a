"""What the indexer's parts share: the per-process `WorkerContext` (and its builder from settings), the
`Dispatcher` seam and the `PlannedJob` a planner returns.

The planners and shard bodies (`work`, `generate`), query encoding (`queries`) and both dispatchers import
this module and it imports none of them, so they form no import cycle. `build_worker_context` is called by
entry points only (Celery worker, API app factory); everything below it takes explicit arguments.
"""

from __future__ import annotations

import fcntl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sqlalchemy.orm import Session, sessionmaker

from indexer.ingest import STALE_TEMPORARY_S, MediaStore
from indexer.models import EncoderInfo, EncoderProvider, GeneratorProvider, describe_encoder
from omniattr.domain import ShardKind
from store.database import check_schema_current, make_engine, make_session_factory
from store.errors import ConflictError, InvalidInputError
from store.vectors import VectorIndex, open_vector_index

if TYPE_CHECKING:
    from omniattr.settings import Settings


class Dispatcher(Protocol):
    """Where work goes: the Celery queues (server profile) or the in-process worker (embedded profile)."""

    def submit(self, kind: ShardKind, shard_ids: Sequence[int]) -> None:
        """Queue shards by id; call after the transaction that created them has committed.

        ServiceUnavailableError when the queue cannot be reached: the shards stay open for a sweeper."""
        ...

    def encode_query(self, *, image_bytes: bytes, attribute: str, timeout: float) -> list[float]:
        """Encode a query image under one attribute; TimeoutError after `timeout` seconds."""
        ...

    def problem(self) -> str | None:
        """None when workers can take work as far as this process can tell, else what is wrong (for health)."""
        ...


@dataclass(frozen=True)
class PlannedJob:
    """A job created in the caller's transaction, and the shards to dispatch once it commits."""

    job_id: int
    kind: ShardKind  # the shard body that runs the shards (an `index_new_images` job's shards are `index`)
    shard_ids: list[int]


class DataDirLock:
    """An exclusive lock on an embedded data directory, held until `close` (the Edge engine and the in-process
    worker assume one owner); a second process is refused at once."""

    def __init__(self, data_dir: Path):
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        self._handle = open(Path(data_dir) / ".omniattr.lock", "wb")  # noqa: SIM115 - held open until close()
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.close()
            raise ConflictError(
                f"the data directory {data_dir} is in use by another omniattr process (probably `omniattr up`); "
                "use that server (the CLI's --url), or stop it first"
            ) from None

    def close(self) -> None:
        """Release the lock."""
        self._handle.close()


@dataclass
class WorkerContext:
    """Everything a shard body needs; built once per process by an entry point from settings."""

    session_factory: sessionmaker[Session]
    vectors: VectorIndex
    media: MediaStore
    encoder: EncoderProvider
    encoder_info: EncoderInfo
    allowed_roots: list[Path] = field(default_factory=list)
    index_batch_size: int = 32
    generator: GeneratorProvider | None = None  # None when no generator is configured
    lock: DataDirLock | None = None  # the embedded data directory's lock, held while this context lives


def build_worker_context(settings: Settings) -> WorkerContext:
    """Open the database, vector index and media store and describe the encoder named by `settings`.

    First tunes malloc for CPU encoding (`encoder.runtime.reuse_freed_memory`), before the vector index or
    the dispatcher start threads of their own.
    """
    from encoder.runtime import reuse_freed_memory  # here: the encoder package imports torch, the API these types

    reuse_freed_memory()
    encoder_path = settings.resolved_encoder_path
    if encoder_path is None:
        raise InvalidInputError(
            "no encoder checkpoint: set OMNIATTR_ENCODER_PATH to a directory written by "
            "AttributeEncoder.save_pretrained (a source checkout ships one in models/starter/encoder), or run "
            f"`omniattr init-encoder` to write an untrained one to {settings.default_encoder_path}"
        )
    engine = make_engine(
        settings.resolved_database_url,
        connect_timeout_s=settings.database_connect_timeout_s,
        statement_timeout_s=settings.database_statement_timeout_s,
    )
    check_schema_current(engine)
    reserve_bytes = settings.disk_reserve_mb * 1024 * 1024
    lock = None
    if settings.qdrant_url:
        vectors = open_vector_index(kind="server", url=settings.qdrant_url, api_key=settings.qdrant_api_key)
    else:
        lock = DataDirLock(settings.data_dir)
        vectors = open_vector_index(kind="embedded", data_dir=settings.vectors_dir, reserve_bytes=reserve_bytes)
    generator = None
    generator_path = settings.resolved_generator_path
    if generator_path is not None:
        generator = GeneratorProvider(
            settings.generator_plugin,
            generator_path,
            device=settings.device,
            steps=settings.generation_steps,
            size=settings.generation_size,
        )
        generator.check()
    media = MediaStore(settings.media_dir, reserve_bytes=reserve_bytes)
    # Temporary files are left by a process killed mid-write. Embedded, this process holds the data directory's
    # lock, so none can be another writer's file in progress: all go. Otherwise (Celery workers may be writing
    # into the same media directory now) only those old enough to be abandoned.
    media.sweep_temporary_files(older_than_s=0 if lock is not None and not settings.broker_url else STALE_TEMPORARY_S)
    return WorkerContext(
        session_factory=make_session_factory(engine),
        vectors=vectors,
        media=media,
        encoder=EncoderProvider(encoder_path, device=settings.device),
        encoder_info=describe_encoder(encoder_path),
        allowed_roots=list(settings.allowed_roots),
        index_batch_size=settings.index_batch_size,
        generator=generator,
        lock=lock,
    )
