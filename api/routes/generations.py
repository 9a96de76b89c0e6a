"""Generations: personalize (one reference) or compose (several) from stored images, as jobs."""

from __future__ import annotations

from fastapi import APIRouter, status
from fastapi.responses import FileResponse

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
    generation = generations.create_generation(
        services,
        references=[Reference(r.image_id, r.attribute, r.weight) for r in body.refs],
        prompt=body.prompt,
        seed=body.seed,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
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
