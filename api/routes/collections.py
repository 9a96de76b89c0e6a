"""Collections, their images (upload, ingest from a path, listing) and their indexed attributes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, HTTPException, Query, UploadFile, status

from api import schemas
from api.deps import ServicesDep
from api.routes.views import collection_public, image_public, job_public
from api.schemas import PathId
from api.usecases import collections, images
from omniattr.domain import ImageStatus

router = APIRouter(prefix="/api/collections", tags=["collections"])

MAX_FILES_PER_UPLOAD = 200


@router.post("", status_code=status.HTTP_201_CREATED, response_model=schemas.CollectionPublic)
def create_collection(body: schemas.CollectionCreate, services: ServicesDep) -> schemas.CollectionPublic:
    """Create an empty collection."""
    return collection_public(collections.create_collection(services, name=body.name, description=body.description))


@router.get("", response_model=schemas.CollectionsPublic)
def list_collections(
    services: ServicesDep,
    offset: Annotated[int, Query(ge=0, le=schemas.MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> schemas.CollectionsPublic:
    """All collections with their image counts and attributes."""
    details = collections.list_collections(services, offset=offset, limit=limit)
    return schemas.CollectionsPublic(data=[collection_public(d) for d in details], count=len(details))


@router.get("/{collection_id}", response_model=schemas.CollectionPublic)
def get_collection(collection_id: PathId, services: ServicesDep) -> schemas.CollectionPublic:
    """One collection."""
    return collection_public(collections.get_collection(services, collection_id=collection_id))


@router.delete("/{collection_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_collection(collection_id: PathId, services: ServicesDep) -> None:
    """Delete a collection, its images' rows and vectors."""
    collections.delete_collection(services, collection_id=collection_id)


@router.get("/{collection_id}/images", response_model=schemas.ImagesPublic)
def list_images(
    collection_id: PathId,
    services: ServicesDep,
    status_: Annotated[ImageStatus | None, Query(alias="status")] = None,
    after_id: Annotated[int, Query(ge=0, le=schemas.MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> schemas.ImagesPublic:
    """A page of a collection's images, in id order."""
    rows = images.list_images(services, collection_id=collection_id, status=status_, after_id=after_id, limit=limit)
    return schemas.ImagesPublic(
        data=[image_public(i) for i in rows],
        count=len(rows),
        next_after_id=rows[-1].id if len(rows) == limit else None,
    )


@router.post("/{collection_id}/images", response_model=schemas.UploadReport)
def upload_images(
    collection_id: PathId, services: ServicesDep, files: Annotated[list[UploadFile], File(description="Image files.")]
) -> schemas.UploadReport:
    """Upload images (many at once); a bad file fails alone; new images are indexed under existing attributes."""
    if len(files) > MAX_FILES_PER_UPLOAD:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"{len(files)} files in one request; send at most {MAX_FILES_PER_UPLOAD} at a time",
        )
    contents = [(f.filename or "upload", f.file.read()) for f in files]
    uploaded = images.upload_images(services, collection_id=collection_id, files=contents)
    return schemas.UploadReport(
        results=[
            schemas.UploadResult(
                source=o.source, image_id=o.image_id, created=o.created, status=o.status, error=o.error
            )
            for o in uploaded.outcomes
        ],
        index_job_id=uploaded.index_job_id,
    )


@router.post("/{collection_id}/ingest", status_code=status.HTTP_202_ACCEPTED, response_model=schemas.JobPublic)
def ingest_path(collection_id: PathId, body: schemas.IngestPathRequest, services: ServicesDep) -> schemas.JobPublic:
    """Ingest every image under a server-side directory (inside the allowed roots) as a job."""
    return job_public(images.ingest_directory(services, collection_id=collection_id, path=body.path))


@router.get("/{collection_id}/attributes", response_model=list[schemas.AttributeState])
def list_attributes(collection_id: PathId, services: ServicesDep) -> list[schemas.AttributeState]:
    """Attributes indexed (or being indexed) for the collection."""
    return collection_public(collections.get_collection(services, collection_id=collection_id)).attributes


@router.post("/{collection_id}/attributes", status_code=status.HTTP_202_ACCEPTED, response_model=schemas.IndexResponse)
def index_attributes(
    collection_id: PathId, body: schemas.AttributesRequest, services: ServicesDep
) -> schemas.IndexResponse:
    """Index the collection under attributes; ones already indexed are skipped (a backfill of the new ones)."""
    detail = collections.index_attributes(services, collection_id=collection_id, attributes=body.attributes)
    if detail is None:
        return schemas.IndexResponse(job=None, detail="every attribute is already indexed or being indexed")
    job = job_public(detail)
    return schemas.IndexResponse(job=job, detail=f"indexing {job.total} (image, attribute) pairs as job {job.id}")
