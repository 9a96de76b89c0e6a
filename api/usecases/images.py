"""Images: upload, ingest from a server path, read (rows, thumbnails, originals), delete."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from api.usecases.context import Services, dispatch, encoder_model_id, ensure_database_space
from api.usecases.jobs import JobDetail, job_detail
from indexer.ingest import IngestOutcome, ingest_bytes, media_type
from indexer.work import plan_index_new_images, plan_ingest_directory
from omniattr.domain import ImageStatus
from store import metadata
from store.errors import NotFoundError, ServiceUnavailableError
from store.tables import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Uploaded:
    """What an upload did: one outcome per file, and the job indexing the new images (if any)."""

    outcomes: list[IngestOutcome]
    index_job_id: int | None


def upload_images(services: Services, *, collection_id: int, files: Sequence[tuple[str, bytes]]) -> Uploaded:
    """Ingest uploaded files (each fails alone) and index the new ones under the collection's attributes."""
    outcomes = []
    with services.session_factory.begin() as session:
        metadata.get_collection(session, collection_id=collection_id)
    services.media.ensure_free(sum(len(data) for _, data in files))  # refused whole (507) rather than half stored
    ensure_database_space(services)
    for name, data in files:
        with services.session_factory.begin() as session:
            outcomes.append(ingest_bytes(session, services.media, collection_id=collection_id, source=name, data=data))
    new_ids = [o.image_id for o in outcomes if o.created and o.status == ImageStatus.READY]
    with services.session_factory.begin() as session:
        plan = plan_index_new_images(
            session,
            collection_id=collection_id,
            image_ids=new_ids,
            encoder_model_id=encoder_model_id(session, services),
        )
    try:
        dispatch(services, plan)
    except ServiceUnavailableError as error:
        # The files are stored and the job is saved: answer with them; the stale-job sweeper queues the job.
        log.warning("upload to collection %s: %s", collection_id, error)
    return Uploaded(outcomes, plan.job_id if plan else None)


def ingest_directory(services: Services, *, collection_id: int, path: str) -> JobDetail:
    """Start an ingest job over a directory inside the allowed roots."""
    ensure_database_space(services)
    with services.session_factory.begin() as session:
        plan = plan_ingest_directory(
            session, collection_id=collection_id, directory=Path(path), allowed_roots=services.allowed_roots
        )
        detail = job_detail(session, metadata.get_job(session, job_id=plan.job_id))
    dispatch(services, plan)
    return detail


def list_images(
    services: Services, *, collection_id: int, status: ImageStatus | None = None, after_id: int = 0, limit: int = 100
) -> list[Image]:
    """A page of a collection's images in id order (pass the last id as `after_id` for the next page)."""
    with services.read_session_factory() as session:
        metadata.get_collection(session, collection_id=collection_id)
        return metadata.list_images(session, collection_id=collection_id, status=status, after_id=after_id, limit=limit)


def get_image(services: Services, *, image_id: int) -> Image:
    """One image's row."""
    with services.read_session_factory() as session:
        return metadata.get_image(session, image_id=image_id)


def _ready(session: Session, image_id: int) -> Image:
    image = metadata.get_image(session, image_id=image_id)
    if image.status != ImageStatus.READY:
        raise NotFoundError(f"image {image_id} has no stored pixels (status {image.status}: {image.error})")
    return image


def thumbnail_path(services: Services, *, image_id: int) -> Path:
    """Where a ready image's JPEG thumbnail is stored."""
    with services.read_session_factory() as session:
        image = _ready(session, image_id)
    return services.media.thumbnail_path(image.sha256)


def original_file(services: Services, *, image_id: int) -> tuple[Path, str]:
    """Where a ready image's original file is stored, and its media type (that of the format it decoded as)."""
    with services.read_session_factory() as session:
        image = _ready(session, image_id)
    return services.media.original_path(image.sha256, image.format), media_type(image.format)


def delete_image(services: Services, *, image_id: int) -> None:
    """Delete an image's vectors and row (its content-addressed file may be shared and is kept)."""
    with services.session_factory.begin() as session:
        metadata.delete_image(session, image_id=image_id)
    # After the commit, like a collection's: a shard writing meanwhile sees the row gone and removes its points.
    for version in services.vectors.list_encoder_versions():
        services.vectors.delete_images(encoder_version=version, image_ids=[image_id])
