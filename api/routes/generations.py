"""Generations: personalize (one reference) or compose (several) from stored images, as jobs; from noise or
from a base image (apply to my image: a stored image or an upload)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile, status
from fastapi.responses import FileResponse
from pydantic import Json

from api import schemas
from api.deps import ServicesDep
from api.routes.views import generation_public
from api.schemas import PathId
from api.usecases import generations
from indexer.generate import Reference

router = APIRouter(prefix="/api/generations", tags=["generations"])


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=schemas.GenerationPublic)
def create_generation(body: schemas.GenerationCreate, services: ServicesDep) -> schemas.GenerationPublic:
    """Render a new image carrying the references' attributes; poll it, or its job, for the result."""
    return _create(services, body)


@router.post("/upload", status_code=status.HTTP_202_ACCEPTED, response_model=schemas.GenerationPublic)
def create_generation_from_upload(
    services: ServicesDep,
    base: Annotated[UploadFile, File(description="The base image to apply the references to.")],
    request: Annotated[
        Json[schemas.GenerationCreate],
        Form(description="The generation request as JSON (the body of POST /api/generations, no base_image_id)."),
    ],
) -> schemas.GenerationPublic:
    """Apply to my image with an uploaded base: the generator starts from it and the references steer it."""
    return _create(services, request, base_upload=base.file.read())


def _create(
    services: ServicesDep, body: schemas.GenerationCreate, base_upload: bytes | None = None
) -> schemas.GenerationPublic:
    generation = generations.create_generation(
        services,
        references=[Reference(r.image_id, r.attribute, r.weight) for r in body.refs],
        prompt=body.prompt,
        seed=body.seed,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        base_image_id=body.base_image_id,
        base_upload=base_upload,
        strength=body.strength,
        keep_detail=body.keep_detail,
    )
    return generation_public(generation)


@router.get("/{generation_id}", response_model=schemas.GenerationPublic)
def get_generation(generation_id: PathId, services: ServicesDep) -> schemas.GenerationPublic:
    """A generation's status, and when done its image URL and transfer scores."""
    return generation_public(generations.get_generation(services, generation_id=generation_id))


@router.get("/{generation_id}/image", response_class=FileResponse, responses={200: {"content": {"image/png": {}}}})
def get_generation_image(generation_id: PathId, services: ServicesDep) -> FileResponse:
    """The generated image (PNG)."""
    return FileResponse(generations.image_path(services, generation_id=generation_id), media_type="image/png")
