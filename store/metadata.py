"""Metadata functions: every read and write of the tables goes through here, never raw queries elsewhere.

Functions flush but never commit: the caller owns the transaction (`with session_factory.begin() as s:`),
so a task is enqueued only after the rows it reads are committed.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import Row, bindparam, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from omniattr import domain
from omniattr.domain import GenerationStatus, ImageStatus, IndexStatus, JobKind, JobStatus, ShardStatus
from store.errors import ConflictError, InvalidInputError, NotFoundError
from store.tables import (
    ApiKey,
    Attribute,
    Collection,
    CollectionAttribute,
    EncoderModel,
    Generation,
    Image,
    Job,
    JobShard,
    utcnow,
)

StatusT = TypeVar("StatusT", bound=StrEnum)


def _get(session: Session, table: type, key: int, what: str):
    row = session.get(table, key)
    if row is None:
        raise NotFoundError(f"{what} {key} does not exist")
    return row


def _member(enum: type[StatusT], value: str, what: str) -> StatusT:
    """`value` as a member of `enum`; InvalidInputError naming the allowed values otherwise."""
    try:
        return enum(value)
    except ValueError:
        raise InvalidInputError(f"{what} {value!r} is not one of {tuple(m.value for m in enum)}") from None


# --- collections -------------------------------------------------------------------------------------


def create_collection(session: Session, *, name: str, description: str = "") -> Collection:
    """Create a collection; a name already in use is a ConflictError."""
    try:
        name = domain.normalize_name(name)
    except domain.InvalidTextError as error:
        raise InvalidInputError(f"collection {error}; pass a name such as 'holiday-photos'") from None
    if session.scalar(select(Collection.id).where(Collection.name == name)) is not None:
        raise ConflictError(f"a collection named {name!r} already exists; pick another name or use it")
    collection = Collection(name=name, description=description)
    session.add(collection)
    session.flush()
    return collection


def get_collection(session: Session, *, collection_id: int) -> Collection:
    """The collection, or NotFoundError."""
    return _get(session, Collection, collection_id, "collection")


def find_collection(session: Session, *, name: str) -> Collection | None:
    """The collection with this name (normalised as `create_collection` stores it), if any."""
    try:
        name = domain.normalize_name(name)
    except domain.InvalidTextError:
        return None  # a name that breaks the rules was never stored
    return session.scalar(select(Collection).where(Collection.name == name))


def list_collections(session: Session, *, offset: int = 0, limit: int = 100) -> list[Collection]:
    """Collections in creation order."""
    return list(session.scalars(select(Collection).order_by(Collection.id).offset(offset).limit(limit)))


def delete_collection(session: Session, *, collection_id: int) -> None:
    """Delete a collection with its images, index state and jobs (vectors are removed by the caller)."""
    session.delete(get_collection(session, collection_id=collection_id))
    session.flush()


# --- images ------------------------------------------------------------------------------------------


def add_image(
    session: Session,
    *,
    collection_id: int,
    source: str,
    sha256: str,
    bytes: int,
    width: int | None = None,
    height: int | None = None,
    format: str | None = None,
    status: ImageStatus = ImageStatus.PENDING,
    error: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> tuple[Image, bool]:
    """Add an image unless its content is already in the collection; returns (image, created)."""
    get_collection(session, collection_id=collection_id)
    status = _member(ImageStatus, status, "image status")
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise InvalidInputError("sha256 must be 64 lowercase hex characters")
    existing = find_image(session, collection_id=collection_id, sha256=sha256)
    if existing is not None:
        return existing, False
    image = Image(
        collection_id=collection_id,
        source=source,
        sha256=sha256,
        bytes=bytes,
        width=width,
        height=height,
        format=format,
        status=status,
        error=error,
        metadata_=metadata or {},
    )
    try:
        with session.begin_nested():  # a concurrent ingest of the same file wins the unique constraint
            session.add(image)
            session.flush()
    except IntegrityError:
        existing = find_image(session, collection_id=collection_id, sha256=sha256)
        if existing is None:
            raise
        return existing, False
    return image, True


def find_image(session: Session, *, collection_id: int, sha256: str) -> Image | None:
    """The image with this content hash in the collection, if any."""
    return session.scalar(select(Image).where(Image.collection_id == collection_id, Image.sha256 == sha256))


def get_image(session: Session, *, image_id: int) -> Image:
    """The image, or NotFoundError."""
    return _get(session, Image, image_id, "image")


# Built once: constructing `Image.id.in_([...])` and its cache key on every call was a large share of a
# search's database time (bench/RESULTS.md, API search by id); an "expanding" parameter takes the list at
# execution instead.
_IMAGES_BY_ID = select(Image).where(Image.id.in_(bindparam("image_ids", expanding=True)))
_IMAGE_ROWS_BY_ID = select(Image.__table__).where(Image.__table__.c.id.in_(bindparam("image_ids", expanding=True)))


def get_images(session: Session, *, image_ids: Sequence[int]) -> dict[int, Image]:
    """The images that still exist among `image_ids`, by id (deleted ones are simply absent)."""
    if not image_ids:
        return {}
    rows = session.scalars(_IMAGES_BY_ID, {"image_ids": list(image_ids)})
    return {row.id: row for row in rows}


def get_image_rows(session: Session, *, image_ids: Sequence[int]) -> dict[int, Row]:
    """Like `get_images`, as read-only rows (columns by name, `metadata` for `metadata_`) for display.

    No ORM objects are built: search reads images twice per request, and rows cost about a quarter less.
    """
    if not image_ids:
        return {}
    return {row.id: row for row in session.execute(_IMAGE_ROWS_BY_ID, {"image_ids": list(image_ids)})}


def list_images(
    session: Session,
    *,
    collection_id: int,
    status: ImageStatus | None = None,
    after_id: int = 0,
    limit: int = 100,
) -> list[Image]:
    """A page of a collection's images in id order (keyset pagination: pass the last id as after_id)."""
    query = select(Image).where(Image.collection_id == collection_id, Image.id > after_id)
    if status is not None:
        query = query.where(Image.status == status)
    return list(session.scalars(query.order_by(Image.id).limit(limit)))


def list_image_ids(session: Session, *, collection_id: int, status: ImageStatus = ImageStatus.READY) -> list[int]:
    """Every image id of a collection with the given status, in id order (for sharding jobs)."""
    query = select(Image.id).where(Image.collection_id == collection_id, Image.status == status)
    return list(session.scalars(query.order_by(Image.id)))


def count_images(session: Session, *, collection_id: int, status: ImageStatus | None = None) -> int:
    """How many images a collection has (optionally of one status)."""
    query = select(func.count(Image.id)).where(Image.collection_id == collection_id)
    if status is not None:
        query = query.where(Image.status == status)
    return session.scalar(query) or 0


def set_image_status(
    session: Session,
    *,
    image_id: int,
    status: ImageStatus,
    error: str | None = None,
    width: int | None = None,
    height: int | None = None,
    format: str | None = None,
) -> Image:
    """Move an image to `status`, recording the error (for failed) or the decoded size (for ready)."""
    status = _member(ImageStatus, status, "image status")
    image = get_image(session, image_id=image_id)
    image.status = status
    image.error = error
    for name, value in (("width", width), ("height", height), ("format", format)):
        if value is not None:
            setattr(image, name, value)
    session.flush()
    return image


def delete_image(session: Session, *, image_id: int) -> None:
    """Delete an image row (its vectors are removed by the caller)."""
    session.delete(get_image(session, image_id=image_id))
    session.flush()


# --- attributes --------------------------------------------------------------------------------------


def normalize_attribute(text: str) -> str:
    """`omniattr.domain.normalize_attribute`, raising the store's InvalidInputError (an HTTP 400)."""
    try:
        return domain.normalize_attribute(text)
    except domain.InvalidTextError as error:
        raise InvalidInputError(str(error)) from None


def find_attribute(session: Session, *, text: str) -> Attribute | None:
    """The attribute with this (normalised) text, if it was ever used."""
    return session.scalar(select(Attribute).where(Attribute.text == normalize_attribute(text)))


def get_attribute(session: Session, *, attribute_id: int) -> Attribute:
    """The attribute, or NotFoundError."""
    return _get(session, Attribute, attribute_id, "attribute")


def get_or_create_attribute(session: Session, *, text: str) -> Attribute:
    """The attribute row for `text`, created on first use."""
    normalized = normalize_attribute(text)
    attribute = session.scalar(select(Attribute).where(Attribute.text == normalized))
    if attribute is not None:
        return attribute
    attribute = Attribute(text=normalized)
    try:
        with session.begin_nested():
            session.add(attribute)
            session.flush()
    except IntegrityError:
        return session.scalar(select(Attribute).where(Attribute.text == normalized))
    return attribute


# --- encoder models ----------------------------------------------------------------------------------


def register_encoder_model(
    session: Session, *, name: str, version: str, backend: str, dimension: int, checkpoint_sha256: str
) -> EncoderModel:
    """Record an encoder version (idempotent); the same version with other weights is a ConflictError."""
    existing = session.scalar(select(EncoderModel).where(EncoderModel.version == version))
    if existing is not None:
        if (existing.dimension, existing.checkpoint_sha256) != (dimension, checkpoint_sha256):
            raise ConflictError(
                f"encoder version {version!r} is already registered with dimension {existing.dimension} and "
                f"checkpoint {existing.checkpoint_sha256[:12]}; a changed model needs a new version string"
            )
        return existing
    model = EncoderModel(
        name=name, version=version, backend=backend, dimension=dimension, checkpoint_sha256=checkpoint_sha256
    )
    session.add(model)
    session.flush()
    return model


def get_encoder_model(session: Session, *, version: str) -> EncoderModel:
    """The registered encoder with this version, or NotFoundError."""
    model = session.scalar(select(EncoderModel).where(EncoderModel.version == version))
    if model is None:
        raise NotFoundError(f"encoder version {version!r} is not registered; index a collection with it first")
    return model


# --- per-collection index state ----------------------------------------------------------------------


def set_collection_attribute(
    session: Session, *, collection_id: int, attribute_id: int, encoder_model_id: int, status: IndexStatus
) -> CollectionAttribute:
    """Record that an attribute is indexing / ready / failed for a collection under an encoder."""
    status = _member(IndexStatus, status, "index status")
    row = session.scalar(
        select(CollectionAttribute).where(
            CollectionAttribute.collection_id == collection_id,
            CollectionAttribute.attribute_id == attribute_id,
            CollectionAttribute.encoder_model_id == encoder_model_id,
        )
    )
    if row is None:
        row = CollectionAttribute(
            collection_id=collection_id, attribute_id=attribute_id, encoder_model_id=encoder_model_id
        )
        session.add(row)
    row.status = status
    session.flush()
    return row


def list_collection_attributes(
    session: Session,
    *,
    collection_id: int,
    encoder_model_id: int | None = None,
    status: IndexStatus | None = None,
) -> list[CollectionAttribute]:
    """The attributes indexed (or indexing) for a collection."""
    query = select(CollectionAttribute).where(CollectionAttribute.collection_id == collection_id)
    if encoder_model_id is not None:
        query = query.where(CollectionAttribute.encoder_model_id == encoder_model_id)
    if status is not None:
        query = query.where(CollectionAttribute.status == status)
    return list(session.scalars(query.order_by(CollectionAttribute.id)))


# --- jobs and shards ---------------------------------------------------------------------------------


# A shard still to run (pending, or running when its worker died) and one that will not run again.
_OPEN_SHARD_STATUSES = (ShardStatus.PENDING, ShardStatus.RUNNING)
_FINISHED_SHARD_STATUSES = (ShardStatus.DONE, ShardStatus.FAILED)
_OPEN_JOB_STATUSES = (JobStatus.PENDING, JobStatus.RUNNING)


@dataclass(frozen=True)
class JobProgress:
    """A job's progress as a reader sees it: counts, rate (units/s) and estimated seconds left."""

    job_id: int
    status: str
    done: int
    failed: int
    total: int
    shards_done: int
    shards_total: int
    rate: float | None
    eta_seconds: float | None


def create_job(
    session: Session,
    *,
    kind: JobKind,
    collection_id: int | None = None,
    encoder_model_id: int | None = None,
    params: dict[str, Any] | None = None,
    shards: Sequence[Sequence[Any]] = (),
    units_per_item: int = 1,
) -> Job:
    """Create a job split into shards of items (image ids, or file paths for ingest).

    Each item counts `units_per_item` towards the totals (e.g. the number of attributes an image is
    encoded under).
    """
    if units_per_item < 1:
        raise InvalidInputError("units_per_item must be at least 1")
    job = Job(
        kind=kind,
        collection_id=collection_id,
        encoder_model_id=encoder_model_id,
        params=params or {},
        total=sum(len(ids) for ids in shards) * units_per_item,
    )
    for position, ids in enumerate(shards):  # ids: one shard's items
        job.shards.append(JobShard(position=position, items=list(ids), total=len(ids) * units_per_item))
    if not shards:
        job.status = JobStatus.DONE
        job.finished_at = utcnow()
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, *, job_id: int) -> Job:
    """The job, or NotFoundError."""
    return _get(session, Job, job_id, "job")


def get_shard(session: Session, *, shard_id: int) -> JobShard:
    """The shard, or NotFoundError."""
    return _get(session, JobShard, shard_id, "job shard")


def list_jobs(
    session: Session, *, collection_id: int | None = None, status: JobStatus | None = None, limit: int = 50
) -> list[Job]:
    """Newest jobs first."""
    query = select(Job)
    if collection_id is not None:
        query = query.where(Job.collection_id == collection_id)
    if status is not None:
        query = query.where(Job.status == status)
    return list(session.scalars(query.order_by(Job.id.desc()).limit(limit)))


def unfinished_shards(session: Session, *, job_id: int) -> list[JobShard]:
    """Shards that still need work (pending, or running when a worker died): what a resume re-enqueues."""
    query = select(JobShard).where(JobShard.job_id == job_id, JobShard.status.in_(_OPEN_SHARD_STATUSES))
    return list(session.scalars(query.order_by(JobShard.position)))


def stale_shards(session: Session, *, updated_before: datetime | None = None) -> list[JobShard]:
    """Open shards of open jobs not touched since `updated_before` (all of them when None): what a sweeper
    dispatches again when no live worker holds them (never queued, or their worker or message was lost)."""
    query = (
        select(JobShard)
        .join(Job, Job.id == JobShard.job_id)
        .where(JobShard.status.in_(_OPEN_SHARD_STATUSES), Job.status.in_(_OPEN_JOB_STATUSES))
    )
    if updated_before is not None:
        query = query.where(JobShard.updated_at < updated_before)
    return list(session.scalars(query.order_by(JobShard.job_id, JobShard.position)))


def touch_shards(session: Session, *, shard_ids: Sequence[int]) -> None:
    """Mark shards as just dispatched, so a sweeper waits its timeout again before it sends them once more."""
    for shard in session.scalars(select(JobShard).where(JobShard.id.in_(list(shard_ids)))):
        shard.updated_at = utcnow()
    session.flush()


def open_index_jobs(session: Session, *, collection_id: int, encoder_model_id: int) -> list[Job]:
    """A collection's pending or running index jobs (either kind) under one encoder, oldest first."""
    query = select(Job).where(
        Job.collection_id == collection_id,
        Job.encoder_model_id == encoder_model_id,
        Job.kind.in_([JobKind.INDEX, JobKind.INDEX_NEW_IMAGES]),
        Job.status.in_(_OPEN_JOB_STATUSES),
    )
    return list(session.scalars(query.order_by(Job.id)))


def indexed_collection_ids(session: Session, *, encoder_model_id: int) -> list[int]:
    """Collections with an attribute indexed (or indexing) under an encoder."""
    query = (
        select(CollectionAttribute.collection_id)
        .where(
            CollectionAttribute.encoder_model_id == encoder_model_id,
            CollectionAttribute.status.in_([IndexStatus.READY, IndexStatus.INDEXING]),
        )
        .distinct()
    )
    return sorted(session.scalars(query))


def start_shard(session: Session, *, shard_id: int) -> JobShard | None:
    """Mark a shard running (one more attempt); None if it is already done or its job is over."""
    shard = session.scalar(select(JobShard).where(JobShard.id == shard_id).with_for_update())
    if shard is None:
        return None
    job = session.scalar(select(Job).where(Job.id == shard.job_id).with_for_update())
    if shard.status in _FINISHED_SHARD_STATUSES or job.status in (JobStatus.CANCELLED, JobStatus.FAILED):
        return None
    now = utcnow()
    shard.status = ShardStatus.RUNNING
    shard.attempts += 1
    shard.started_at = shard.started_at or now
    if job.status == JobStatus.PENDING:
        job.status = JobStatus.RUNNING
        job.started_at = now
    session.flush()
    return shard


def finish_shard(session: Session, *, shard_id: int, done: int, failed: int, error: str | None = None) -> Job:
    """Record a shard's result and roll its counts up into the job; the last shard finishes the job."""
    shard = get_shard(session, shard_id=shard_id)
    shard.status = ShardStatus.DONE
    shard.done, shard.failed, shard.error = done, failed, error
    shard.finished_at = utcnow()
    session.flush()
    return _roll_up(session, job_id=shard.job_id)


def fail_shard(session: Session, *, shard_id: int, error: str, max_attempts: int) -> JobShard:
    """Record a failed attempt: back to pending while attempts remain, else failed for good.

    A shard that already finished keeps its result (the failure came after it, e.g. queueing a follow-up job).
    """
    shard = get_shard(session, shard_id=shard_id)
    if shard.status in _FINISHED_SHARD_STATUSES:
        return shard
    shard.error = error
    shard.status = ShardStatus.PENDING if shard.attempts < max_attempts else ShardStatus.FAILED
    if shard.status == ShardStatus.FAILED:
        shard.failed = shard.total - shard.done
        shard.finished_at = utcnow()
    session.flush()
    _roll_up(session, job_id=shard.job_id)
    return shard


def _roll_up(session: Session, *, job_id: int) -> Job:
    # Lock the job row so concurrent shard completions serialise their sums (no-op on SQLite,
    # which serialises writers anyway).
    job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
    done, failed, open_shards, failed_shards = session.execute(
        select(
            func.coalesce(func.sum(JobShard.done), 0),
            func.coalesce(func.sum(JobShard.failed), 0),
            func.count(JobShard.id).filter(JobShard.status.in_(_OPEN_SHARD_STATUSES)),
            func.count(JobShard.id).filter(JobShard.status == ShardStatus.FAILED),
        ).where(JobShard.job_id == job_id)
    ).one()
    job.done, job.failed = int(done), int(failed)
    if open_shards == 0 and job.status != JobStatus.CANCELLED:
        job.status = JobStatus.FAILED if failed_shards and failed_shards == len(job.shards) else JobStatus.DONE
        job.finished_at = utcnow()
        if failed_shards:
            # The first failure's reason, so the API and CLI can say why (e.g. the disk is down to its reserve).
            first_error = session.scalar(
                select(JobShard.error)
                .where(JobShard.job_id == job_id, JobShard.status == ShardStatus.FAILED)
                .order_by(JobShard.id)
                .limit(1)
            )
            job.error = f"{failed_shards} of {len(job.shards)} shards failed; the first: {first_error}"
    session.flush()
    return job


def cancel_job(session: Session, *, job_id: int) -> Job:
    """Stop a job: its unstarted shards are skipped by workers."""
    job = get_job(session, job_id=job_id)
    if job.status in _OPEN_JOB_STATUSES:
        job.status = JobStatus.CANCELLED
        job.finished_at = utcnow()
    session.flush()
    return job


def job_progress(session: Session, *, job_id: int, now: datetime | None = None) -> JobProgress:
    """Counts, rate and ETA of a job, readable at any time."""
    job = get_job(session, job_id=job_id)
    shards_done = sum(1 for shard in job.shards if shard.status in _FINISHED_SHARD_STATUSES)
    rate = eta = None
    if job.started_at is not None and job.done + job.failed > 0:
        end = job.finished_at or now or utcnow()
        started = job.started_at
        if started.tzinfo is None and end.tzinfo is not None:  # SQLite returns naive UTC datetimes
            end = end.replace(tzinfo=None)
        elapsed = max((end - started).total_seconds(), 1e-6)
        rate = (job.done + job.failed) / elapsed
        remaining = max(job.total - job.done - job.failed, 0)
        eta = remaining / rate if job.status in _OPEN_JOB_STATUSES else 0.0
    return JobProgress(
        job_id=job.id,
        status=job.status,
        done=job.done,
        failed=job.failed,
        total=job.total,
        shards_done=shards_done,
        shards_total=len(job.shards),
        rate=rate,
        eta_seconds=eta,
    )


# --- generations -------------------------------------------------------------------------------------


def create_generation(session: Session, *, request: dict[str, Any], job_id: int | None = None) -> Generation:
    """Record a personalize/compose request before it runs."""
    generation = Generation(request=request, job_id=job_id)
    session.add(generation)
    session.flush()
    return generation


def get_generation(session: Session, *, generation_id: int) -> Generation:
    """The generation, or NotFoundError."""
    return _get(session, Generation, generation_id, "generation")


def finish_generation(
    session: Session, *, generation_id: int, output_path: str, transfer_scores: dict[str, float]
) -> Generation:
    """Store a generation's output image path and its attribute-transfer scores."""
    generation = get_generation(session, generation_id=generation_id)
    generation.status = GenerationStatus.DONE
    generation.output_path = output_path
    generation.transfer_scores = dict(transfer_scores)
    session.flush()
    return generation


def fail_generation(session: Session, *, generation_id: int, error: str) -> Generation:
    """Record why a generation failed."""
    generation = get_generation(session, generation_id=generation_id)
    generation.status = GenerationStatus.FAILED
    generation.error = error
    session.flush()
    return generation


# --- API keys ----------------------------------------------------------------------------------------

API_KEY_PREFIX = "oa_"


def _hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def create_api_key(session: Session, *, name: str) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the plaintext, which is never stored and shown only now."""
    plaintext = API_KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(name=name, prefix=plaintext[:10], key_hash=_hash_key(plaintext))
    session.add(key)
    session.flush()
    return key, plaintext


def verify_api_key(session: Session, *, plaintext: str) -> ApiKey | None:
    """The live key matching `plaintext` (and note its use), or None."""
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == _hash_key(plaintext)))
    if key is None or key.revoked_at is not None:
        return None
    key.last_used_at = utcnow()
    session.flush()
    return key


def list_api_keys(session: Session) -> list[ApiKey]:
    """All keys, revoked ones included."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_api_key(session: Session, *, key_id: int) -> ApiKey:
    """Revoke a key; it stops working at once."""
    key = _get(session, ApiKey, key_id, "API key")
    key.revoked_at = key.revoked_at or utcnow()
    session.flush()
    return key
