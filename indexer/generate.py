"""Generations: personalize / compose requests planned as jobs and run by a worker with the generator plugin.

A request names stored images and attributes; the worker loads the references, encodes them with the
process's encoder, runs the plugin's pipeline (all N + 2 conditions in one forward per step), saves the
image and stores each attribute's transfer score (re-encoding of the output vs. the reference).

Apply to my image: a request may also name a base image to start from (a stored image, `base_image_id`, or
an uploaded file kept under `generations/bases/` by its sha256, `base_upload`) and a `strength` in (0, 1]
(the pipeline's img2img convention; DEFAULT_BASE_STRENGTH when not given), and `keep_detail`, the blur sigma in
output pixels under which the output keeps the base's own detail (when not given: DEFAULT_KEEP_DETAIL, or 0
when an attribute names a style or a texture; 0: off).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from indexer.context import PlannedJob, WorkerContext
from indexer.ingest import ImageRejected, MediaStore, decode_image, sha256_hex
from indexer.models import GeneratorProvider
from omniattr.domain import DEFAULT_BASE_STRENGTH, MAX_REFERENCES, ImageStatus, JobKind, default_keep_detail
from store import metadata
from store.errors import ConflictError, InvalidInputError, StoreError


@dataclass(frozen=True)
class Reference:
    """One reference of a request: a stored image, the attribute taken from it, its weight."""

    image_id: int
    attribute: str
    weight: float = 1.0


def plan_generation(
    session: Session,
    *,
    references: list[Reference],
    prompt: str,
    seed: int | None = None,
    steps: int | None = None,
    guidance_scale: float = 1.0,
    base_image_id: int | None = None,
    base_upload: str | None = None,
    strength: float | None = None,
    keep_detail: float | None = None,
    generator_available: bool = True,
) -> tuple[PlannedJob, int]:
    """Record a generation request and its one-shard job; returns (plan, generation id).

    `base_image_id` (a stored image) or `base_upload` (the sha256 of a file `store_base_upload` kept) makes it
    apply-to-my-image at `strength` (DEFAULT_BASE_STRENGTH when None), keeping the base's detail finer than
    `keep_detail` output pixels (when None, `default_keep_detail` of the references' attributes: DEFAULT_KEEP_DETAIL,
    or 0 when one names a style or a texture; 0 keeps the generator's output as is).
    """
    require_generator(generator_available)
    if not 1 <= len(references) <= MAX_REFERENCES:
        raise InvalidInputError(f"give between 1 and {MAX_REFERENCES} references; got {len(references)}")
    prompt = " ".join(prompt.split())
    if not prompt:
        raise InvalidInputError("the prompt is empty; describe the image to make, e.g. 'a cup on a table'")
    refs = []
    for reference in references:
        image = metadata.get_image(session, image_id=reference.image_id)
        if image.status != ImageStatus.READY:
            raise InvalidInputError(f"image {image.id} cannot be a reference: its status is {image.status}")
        if not reference.weight > 0:
            raise InvalidInputError(f"reference weights must be positive; got {reference.weight}")
        refs.append(
            {
                "image_id": image.id,
                "attribute": metadata.normalize_attribute(reference.attribute),
                "weight": reference.weight,
            }
        )
    if base_image_id is not None and base_upload is not None:
        raise InvalidInputError("give one base image: base_image_id or an uploaded file, not both")
    if base_image_id is None and base_upload is None:
        if strength is not None:
            raise InvalidInputError(
                "strength needs a base image to start from: give base_image_id or upload one (or leave strength out)"
            )
        if keep_detail is not None:
            raise InvalidInputError(
                "keep_detail keeps a base image's detail: give base_image_id or upload one (or leave keep_detail out)"
            )
    else:
        if base_image_id is not None:
            base = metadata.get_image(session, image_id=base_image_id)  # NotFoundError: 404
            if base.status != ImageStatus.READY:
                raise InvalidInputError(f"image {base.id} cannot be the base image: its status is {base.status}")
        strength = DEFAULT_BASE_STRENGTH if strength is None else strength
        if keep_detail is None:
            keep_detail = default_keep_detail(ref["attribute"] for ref in refs)
    request = {
        "refs": refs,
        "prompt": prompt,
        "seed": seed,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "base_image_id": base_image_id,
        "base_upload": base_upload,
        "strength": strength,
        "keep_detail": keep_detail,
    }
    job = metadata.create_job(session, kind=JobKind.GENERATE, params={}, shards=[[0]])
    generation = metadata.create_generation(session, request=request, job_id=job.id)
    job.shards[0].items = [generation.id]
    job.params = {"generation_id": generation.id}
    session.flush()
    return PlannedJob(job.id, JobKind.GENERATE.shard_kind, [job.shards[0].id]), generation.id


def require_generator(generator_available: bool) -> None:
    """ConflictError, saying how to configure one, when this server has no generator."""
    if not generator_available:
        raise ConflictError(
            "generations are off on this server: no OMNIATTR_GENERATOR_PATH and no shipped starter generator, or "
            "OMNIATTR_GENERATIONS_ENABLED=false; set OMNIATTR_GENERATOR_PATH to a diffusers-format generator "
            "directory (and OMNIATTR_GENERATOR_PLUGIN if it is not 'flux')"
        )


def base_upload_path(media: MediaStore, sha256: str) -> Path:
    """Where an uploaded base image is kept (decoded, oriented, RGB, as PNG), named by the uploaded file's sha256."""
    return media.root / "generations" / "bases" / f"{sha256}.png"


def decode_base_upload(data: bytes) -> tuple[str, bytes]:
    """Check an uploaded base image (ingest's decode checks); returns (the file's sha256, the image as PNG)."""
    try:
        decoded = decode_image(data)
    except ImageRejected as rejected:
        raise InvalidInputError(f"the base image cannot be used: {rejected}") from None
    buffer = io.BytesIO()
    decoded.image.save(buffer, format="PNG")  # oriented RGB: what the worker opens needs no further checks
    return sha256_hex(data), buffer.getvalue()


def keep_base_upload(media: MediaStore, sha256: str, png: bytes) -> None:
    """Write a decoded base upload where `base_upload_path` finds it (once per content)."""
    path = base_upload_path(media, sha256)
    if not path.exists():
        media.write_file(path, png)


def output_path(context: WorkerContext, generation_id: int) -> Path:
    """Where a generation's image is stored."""
    return context.media.root / "generations" / f"{generation_id}.png"


def run_generate_shard(context: WorkerContext, shard_id: int) -> str:
    """Render one generation request and store its image and transfer scores; a failure is recorded on it."""
    with context.session_factory.begin() as session:
        shard = metadata.start_shard(session, shard_id=shard_id)
        if shard is None:
            return "skipped"
        generation_id = shard.items[0]
        request = dict(metadata.get_generation(session, generation_id=generation_id).request)
        base_image_id = request.get("base_image_id")
        image_ids = [r["image_id"] for r in request["refs"]] + ([base_image_id] if base_image_id is not None else [])
        rows = metadata.get_images(session, image_ids=image_ids)
        sources = {i: (row.sha256, row.format) for i, row in rows.items()}
    missing = [r["image_id"] for r in request["refs"] if r["image_id"] not in sources]
    base_missing = base_image_id is not None and base_image_id not in sources
    if missing or base_missing or context.generator is None:
        if missing:
            error = f"reference images {missing} were deleted"
        elif base_missing:
            error = f"the base image {base_image_id} was deleted"
        else:
            error = "no generator is configured"
        _fail(context, shard_id=shard_id, generation_id=generation_id, error=error)
        return "failed"
    try:
        path, scores = _render(context, context.generator, generation_id, request, sources)
    except Exception as error:  # noqa: BLE001 - any failure (weights, plugin, disk) is the generation's, shown to its user
        message = str(error) if isinstance(error, StoreError) else f"{error.__class__.__name__}: {error}"
        _fail(context, shard_id=shard_id, generation_id=generation_id, error=message)
        return "failed"
    with context.session_factory.begin() as session:
        metadata.finish_generation(session, generation_id=generation_id, output_path=str(path), transfer_scores=scores)
        metadata.finish_shard(session, shard_id=shard_id, done=1, failed=0, error=None)
    return "done"


def _fail(context: WorkerContext, *, shard_id: int, generation_id: int, error: str) -> None:
    """Record a failed generation and its shard, so the page and the CLI show the error."""
    with context.session_factory.begin() as session:
        metadata.fail_generation(session, generation_id=generation_id, error=error)
        # Failed for good (no retry: a generation that failed once fails again): the job ends failed too.
        metadata.fail_shard(session, shard_id=shard_id, error=error, max_attempts=0)


def _render(
    context: WorkerContext,
    generator_provider: GeneratorProvider,
    generation_id: int,
    request: dict[str, Any],
    sources: dict[int, tuple[str, str | None]],
) -> tuple[Path, dict[str, float]]:
    """Run the pipeline on the references and save the image; returns its path and transfer scores."""
    import torch
    from PIL import Image

    images = {}
    for image_id, (sha256, file_format) in sources.items():
        with Image.open(context.media.original_path(sha256, file_format)) as opened:
            images[image_id] = opened.convert("RGB")
    refs = [(images[r["image_id"]], r["attribute"], r["weight"]) for r in request["refs"]]
    base = None  # apply to my image: the stored or uploaded image to start from
    if request.get("base_image_id") is not None:
        base = images[request["base_image_id"]]
    elif request.get("base_upload") is not None:
        with Image.open(base_upload_path(context.media, request["base_upload"])) as opened:
            base = opened.convert("RGB")
    pipeline = generator_provider.get()
    seed = request.get("seed")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    output = pipeline(
        prompt=request["prompt"],
        refs=refs,
        attribute_encoder=context.encoder.get(),
        guidance_scale=request.get("guidance_scale") or 1.0,
        num_inference_steps=request.get("steps") or generator_provider.steps,
        generator=generator,
        height=generator_provider.size,
        width=generator_provider.size,
        image=base,
        strength=request.get("strength"),
        keep_detail=request.get("keep_detail"),  # absent from requests recorded before it existed: off
    )
    buffer = io.BytesIO()
    output.images[0].save(buffer, format="PNG")
    path = output_path(context, generation_id)
    context.media.write_file(path, buffer.getvalue())  # checks the disk reserve; no temporary file is left
    return path, _named_scores(request["refs"], output.transfer_scores[0])


def _named_scores(refs: list[dict], scores: Any) -> dict[str, float]:
    """{attribute: score}; an attribute taken from several images is named with each image id."""
    counts: dict[str, int] = {}
    for ref in refs:
        counts[ref["attribute"]] = counts.get(ref["attribute"], 0) + 1
    named = {}
    for ref, score in zip(refs, list(scores), strict=True):
        key = ref["attribute"] if counts[ref["attribute"]] == 1 else f"{ref['attribute']} (image {ref['image_id']})"
        named[key] = round(float(score), 6)
    return named
