"""Generations: personalize (one reference) or compose (several) from stored images, as jobs."""

from __future__ import annotations

from fastapi import APIRouter, status
from fastapi.responses import FileResponse

from api import schemas, services
from api.deps import ReadSessionDep, ServicesDep
from api.schemas import PathId
from indexer.generate import Reference
from store import metadata
from store.errors import NotFoundError
from store.tables import Generation

router = APIRouter(prefix="/api/generations", tags=["generations"])


def generation_public(generation: Generation) -> schemas.GenerationPublic:
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


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=schemas.GenerationPublic)
def create_generation(body: schemas.GenerationCreate, services_: ServicesDep) -> schemas.GenerationPublic:
    """Render a new image carrying the references' attributes; poll it, or its job, for the result."""
    generation_id = services.create_generation(
        services_,
        references=[Reference(r.image_id, r.attribute, r.weight) for r in body.refs],
        prompt=body.prompt,
        seed=body.seed,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
    )
    with services_.read_session_factory() as session:
        return generation_public(metadata.get_generation(session, generation_id=generation_id))


@router.get("/{generation_id}", response_model=schemas.GenerationPublic)
def get_generation(generation_id: PathId, session: ReadSessionDep) -> schemas.GenerationPublic:
    """A generation's status, and when done its image URL and transfer scores."""
    return generation_public(metadata.get_generation(session, generation_id=generation_id))


@router.get("/{generation_id}/image", response_class=FileResponse, responses={200: {"content": {"image/png": {}}}})
def get_generation_image(generation_id: PathId, session: ReadSessionDep) -> FileResponse:
    """The generated image (PNG)."""
    generation = metadata.get_generation(session, generation_id=generation_id)
    if not generation.output_path:
        raise NotFoundError(f"generation {generation_id} has no image yet (status {generation.status})")
    return FileResponse(generation.output_path, media_type="image/png")
