"""Single images: metadata, thumbnail, original, delete."""

from __future__ import annotations

from fastapi import APIRouter, status
from fastapi.responses import FileResponse

from api import schemas
from api.deps import ServicesDep
from api.routes.views import image_public
from api.schemas import PathId
from api.usecases import images

router = APIRouter(prefix="/api/images", tags=["images"])


@router.get("/{image_id}", response_model=schemas.ImagePublic)
def get_image(image_id: PathId, services: ServicesDep) -> schemas.ImagePublic:
    """One image's metadata."""
    return image_public(images.get_image(services, image_id=image_id))


@router.get("/{image_id}/thumbnail", response_class=FileResponse, responses={200: {"content": {"image/jpeg": {}}}})
def get_thumbnail(image_id: PathId, services: ServicesDep) -> FileResponse:
    """A JPEG thumbnail (longer side 256 px)."""
    return FileResponse(
        images.thumbnail_path(services, image_id=image_id),
        media_type="image/jpeg",
        headers={"Cache-Control": "public, max-age=86400, immutable"},
    )


@router.get("/{image_id}/original", response_class=FileResponse, responses={200: {"content": {"image/*": {}}}})
def get_original(image_id: PathId, services: ServicesDep) -> FileResponse:
    """The original file as ingested, served as the image type its bytes decoded as."""
    path, media_type = images.original_file(services, image_id=image_id)
    return FileResponse(path, media_type=media_type)


@router.delete("/{image_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_image(image_id: PathId, services: ServicesDep) -> None:
    """Delete an image's row and vectors."""
    images.delete_image(services, image_id=image_id)
