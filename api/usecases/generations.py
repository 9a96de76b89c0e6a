"""Generations: personalize (one reference) or compose (several) from stored images, as jobs; from noise or
from a base image (apply to my image: a stored image or an upload)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from api.usecases.context import Services, dispatch
from indexer.generate import Reference, decode_base_upload, keep_base_upload, plan_generation, require_generator
from store import metadata
from store.errors import NotFoundError
from store.tables import Generation


def create_generation(
    services: Services,
    *,
    references: Sequence[Reference],
    prompt: str,
    seed: int | None = None,
    steps: int | None = None,
    guidance_scale: float = 1.0,
    base_image_id: int | None = None,
    base_upload: bytes | None = None,
    strength: float | None = None,
    keep_detail: float | None = None,
) -> Generation:
    """Record a personalize (one reference) or compose request and start its job; returns its row.

    With `base_image_id` (a stored image) or `base_upload` (an image file's bytes) it is apply-to-my-image:
    the generator starts from that image at `strength`, and the output keeps its detail finer than `keep_detail`.
    """
    upload = None  # (sha256, PNG bytes): decoded before the transaction, written inside it
    if base_upload is not None:
        require_generator(services.generator_plugin is not None)  # before any decoding
        upload = decode_base_upload(base_upload)
    with services.session_factory.begin() as session:
        plan, generation_id = plan_generation(
            session,
            references=list(references),
            prompt=prompt,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            base_image_id=base_image_id,
            base_upload=upload[0] if upload else None,
            strength=strength,
            keep_detail=keep_detail,
            generator_available=services.generator_plugin is not None,
        )
        if upload is not None:  # the request is valid: keep the base; a failed write rolls the request back
            keep_base_upload(services.media, *upload)
        generation = metadata.get_generation(session, generation_id=generation_id)
    dispatch(services, plan)
    return generation


def get_generation(services: Services, *, generation_id: int) -> Generation:
    """A generation's row: its status, and when done its output and transfer scores."""
    with services.read_session_factory() as session:
        return metadata.get_generation(session, generation_id=generation_id)


def image_path(services: Services, *, generation_id: int) -> Path:
    """Where a finished generation's PNG is stored; NotFoundError while it has none."""
    generation = get_generation(services, generation_id=generation_id)
    if not generation.output_path:
        raise NotFoundError(f"generation {generation_id} has no image yet (status {generation.status})")
    return Path(generation.output_path)
