"""Builds a WorkerContext from settings; called by entry points only (Celery worker, embedded server)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from indexer.ingest import MediaStore
from indexer.models import EncoderProvider, describe_encoder
from indexer.work import WorkerContext
from store.database import check_schema_current, make_engine, make_session_factory
from store.errors import InvalidInputError
from store.vectors import open_vector_index

if TYPE_CHECKING:
    from omniattr.settings import Settings


def build_worker_context(settings: Settings) -> WorkerContext:
    """Open the database, vector index and media store and describe the encoder named by `settings`."""
    if settings.encoder_path is None:
        raise InvalidInputError(
            "no encoder checkpoint is configured; set OMNIATTR_ENCODER_PATH to a directory written by "
            "AttributeEncoder.save_pretrained"
        )
    engine = make_engine(settings.resolved_database_url)
    check_schema_current(engine)
    if settings.qdrant_url:
        vectors = open_vector_index(kind="server", url=settings.qdrant_url, api_key=settings.qdrant_api_key)
    else:
        vectors = open_vector_index(kind="embedded", data_dir=settings.vectors_dir)
    return WorkerContext(
        session_factory=make_session_factory(engine),
        vectors=vectors,
        media=MediaStore(settings.media_dir),
        encoder=EncoderProvider(settings.encoder_path, device=settings.device),
        encoder_info=describe_encoder(settings.encoder_path),
        allowed_roots=list(settings.allowed_roots),
        index_batch_size=settings.index_batch_size,
    )
