"""What the use cases return -> public schemas (the one place that knows both); no queries here."""

from __future__ import annotations

from sqlalchemy import Row

from api import schemas
from api.usecases.collections import CollectionDetail
from api.usecases.jobs import JobDetail
from store.tables import Generation, Image


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


def collection_public(detail: CollectionDetail) -> schemas.CollectionPublic:
    """A collection's public form, with its image counts and attribute states."""
    collection = detail.collection
    return schemas.CollectionPublic(
        id=collection.id,
        name=collection.name,
        description=collection.description,
        created_at=collection.created_at,
        image_count=detail.image_count,
        failed_count=detail.failed_count,
        attributes=[schemas.AttributeState(attribute=a.attribute, status=a.status) for a in detail.attributes],
    )


def job_public(detail: JobDetail) -> schemas.JobPublic:
    """A job's public form, with its progress."""
    job, progress = detail.job, detail.progress
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


def generation_public(generation: Generation) -> schemas.GenerationPublic:
    """A generation's public form; `output_url` once its image exists."""
    return schemas.GenerationPublic(
        id=generation.id,
        job_id=generation.job_id,
        status=generation.status,
        request=generation.request,
        output_url=f"/api/generations/{generation.id}/image" if generation.output_path else None,
        transfer_scores=generation.transfer_scores or {},
        error=generation.error,
        created_at=generation.created_at,
    )
