"""Table rows -> public schemas (the one place that knows both)."""

from __future__ import annotations

from sqlalchemy import Row
from sqlalchemy.orm import Session

from api import schemas
from store import metadata
from store.tables import Collection, Image, Job


def image_public(image: Image | Row) -> schemas.ImagePublic:
    """An image's public form, from its table row or a `metadata.get_image_rows` row."""
    return schemas.ImagePublic(
        id=image.id,
        collection_id=image.collection_id,
        source=image.source,
        sha256=image.sha256,
        width=image.width,
        height=image.height,
        format=image.format,
        bytes=image.bytes,
        status=image.status,
        error=image.error,
        thumbnail_url=f"/api/images/{image.id}/thumbnail",
        created_at=image.created_at,
    )


def collection_public(session: Session, collection: Collection) -> schemas.CollectionPublic:
    states = metadata.list_collection_attributes(session, collection_id=collection.id)
    return schemas.CollectionPublic(
        id=collection.id,
        name=collection.name,
        description=collection.description,
        created_at=collection.created_at,
        image_count=metadata.count_images(session, collection_id=collection.id, status="ready"),
        failed_count=metadata.count_images(session, collection_id=collection.id, status="failed"),
        attributes=[schemas.AttributeState(attribute=s.attribute.text, status=s.status) for s in states],
    )


def job_public(session: Session, job: Job) -> schemas.JobPublic:
    progress = metadata.job_progress(session, job_id=job.id)
    return schemas.JobPublic(
        id=job.id,
        kind=job.kind,
        status=job.status,
        collection_id=job.collection_id,
        done=progress.done,
        failed=progress.failed,
        total=progress.total,
        shards_done=progress.shards_done,
        shards_total=progress.shards_total,
        rate=progress.rate,
        eta_seconds=progress.eta_seconds,
        error=job.error,
        created_at=job.created_at,
        finished_at=job.finished_at,
    )
