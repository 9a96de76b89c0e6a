"""Single images: metadata, thumbnail, original, delete."""

from __future__ import annotations

from fastapi import APIRouter, status
from fastapi.responses import FileResponse

from api import schemas, services
from api.deps import ReadSessionDep, ServicesDep
from api.routes.views import image_public
from api.schemas import PathId
from store import metadata
from store.errors import NotFoundError

router = APIRouter(prefix="/api/images", tags=["images"])


@router.get("/{image_id}", response_model=schemas.ImagePublic)
def get_image(image_id: PathId, session: ReadSessionDep) -> schemas.ImagePublic:
    """One image's metadata."""
    return image_public(metadata.get_image(session, image_id=image_id))


def _ready(session, image_id: int):
    image = metadata.get_image(session, image_id=image_id)
    if image.status != "ready":
        raise NotFoundError(f"image {image_id} has no stored pixels (status {image.status}: {image.error})")
    return image


@router.get("/{image_id}/thumbnail", response_class=FileResponse, responses={200: {"content": {"image/jpeg": {}}}})
def get_thumbnail(image_id: PathId, session: ReadSessionDep, services_: ServicesDep) -> FileResponse:
    """A JPEG thumbnail (longer side 256 px)."""
    image = _ready(session, image_id)
    return FileResponse(
        services_.media.thumbnail_path(image.sha256),
        media_type="image/jpeg",
        headers={"Cache-Control": "public, max-age=86400, immutable"},
    )


@router.get("/{image_id}/original", response_class=FileResponse, responses={200: {"content": {"image/*": {}}}})
def get_original(image_id: PathId, session: ReadSessionDep, services_: ServicesDep) -> FileResponse:
    """The original file as ingested."""
    image = _ready(session, image_id)
    return FileResponse(services_.media.original_path(image.sha256, image.format))


@router.delete("/{image_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_image(image_id: PathId, services_: ServicesDep) -> None:
    """Delete an image's row and vectors."""
    services.delete_image(services_, image_id=image_id)
