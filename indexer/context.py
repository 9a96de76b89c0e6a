"""Builds a WorkerContext from settings; called by entry points only (Celery worker, embedded server)."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO, TYPE_CHECKING

from encoder.runtime import reuse_freed_memory
from indexer.generate import GeneratorProvider
from indexer.ingest import MediaStore
from indexer.models import EncoderProvider, describe_encoder
from indexer.work import WorkerContext
from store.database import check_schema_current, make_engine, make_session_factory
from store.errors import ConflictError, InvalidInputError
from store.vectors import open_vector_index

if TYPE_CHECKING:
    from omniattr.settings import Settings


def build_worker_context(settings: Settings) -> WorkerContext:
    """Open the database, vector index and media store and describe the encoder named by `settings`.

    First tunes malloc for CPU encoding (`encoder.runtime.reuse_freed_memory`), before the vector index or
    the dispatcher start threads of their own.
    """
    reuse_freed_memory()
    encoder_path = settings.resolved_encoder_path
    if encoder_path is None:
        raise InvalidInputError(
            "no encoder checkpoint: set OMNIATTR_ENCODER_PATH to a directory written by "
            "AttributeEncoder.save_pretrained (a source checkout ships one in models/starter/encoder), or run "
            f"`omniattr init-encoder` to write an untrained one to {settings.default_encoder_path}"
        )
    engine = make_engine(settings.resolved_database_url)
    check_schema_current(engine)
    lock = None
    if settings.qdrant_url:
        vectors = open_vector_index(kind="server", url=settings.qdrant_url, api_key=settings.qdrant_api_key)
    else:
        lock = lock_data_dir(settings.data_dir)
        vectors = open_vector_index(kind="embedded", data_dir=settings.vectors_dir)
    return WorkerContext(
        session_factory=make_session_factory(engine),
        vectors=vectors,
        media=MediaStore(settings.media_dir),
        encoder=EncoderProvider(encoder_path, device=settings.device),
        encoder_info=describe_encoder(encoder_path),
        allowed_roots=list(settings.allowed_roots),
        index_batch_size=settings.index_batch_size,
        generator=(
            GeneratorProvider(
                settings.generator_plugin,
                settings.generator_path,
                device=settings.device,
                steps=settings.generation_steps,
                size=settings.generation_size,
            )
            if settings.generator_path
            else None
        ),
        lock=lock,
    )


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Hold an exclusive lock on an embedded data directory for this process's life (the Edge engine and
    the in-process worker assume one owner); a second process is refused at once."""
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    handle = open(Path(data_dir) / ".omniattr.lock", "wb")  # noqa: SIM115 - held open until the process ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConflictError(
            f"the data directory {data_dir} is in use by another omniattr process (probably `omniattr up`); "
            "use that server (the CLI's --url), or stop it first"
        ) from None
    return handle
