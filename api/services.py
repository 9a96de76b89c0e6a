"""What the API and the CLI do, in one place: the routes and the in-process CLI both call these.

`Services` holds the process's handles (database, vector index, dispatcher); it is built by an entry point
from settings (`build_services`) and closed on shutdown.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Row
from sqlalchemy.orm import Session, sessionmaker

from indexer.generate import Reference, plan_generation
from indexer.ingest import MediaStore, ingest_bytes
from indexer.models import EncoderInfo
from indexer.work import (
    PlannedJob,
    plan_index_attributes,
    plan_index_new_images,
    plan_ingest_directory,
    register_encoder,
    resume_job,
)
from store import metadata
from store.database import make_session_factory
from store.errors import ConflictError, InvalidInputError
from store.search import RankedImage, SearchTerm, search_images
from store.vectors import VectorIndex, point_id

if TYPE_CHECKING:
    from omniattr.settings import Settings


class IndexStateCache:
    """Per collection, the attributes indexed under this process's encoder: text -> (attribute id, status).

    Search reads it on every request; entries live `ttl` seconds. A miss or a non-ready status is always
    re-read from the database before it becomes an error, so a job that just finished is seen at once.
    """

    def __init__(self, ttl: float = 2.0):
        self.ttl = ttl
        self._entries: dict[int, tuple[float, dict[str, tuple[int, str]]]] = {}
        self._lock = threading.Lock()

    def get(self, session: Session, *, collection_id: int, encoder_model_id: int, fresh: bool = False):
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(collection_id)
        if entry is not None and not fresh and now - entry[0] < self.ttl:
            return entry[1]
        rows = metadata.list_collection_attributes(
            session, collection_id=collection_id, encoder_model_id=encoder_model_id
        )
        state = {row.attribute.text: (row.attribute_id, row.status) for row in rows}
        with self._lock:
            self._entries[collection_id] = (now, state)
        return state


@dataclass
class Services:
    """The handles one API (or CLI) process works with."""

    session_factory: sessionmaker[Session]
    read_session_factory: sessionmaker[Session]  # queries only: never waits for writers
    vectors: VectorIndex
    media: MediaStore
    dispatcher: Any  # InProcessDispatcher (embedded) or CeleryDispatcher (server): submit(), encode_query()
    encoder_info: EncoderInfo
    allowed_roots: list[Path] = field(default_factory=list)
    query_timeout_s: float = 30.0
    api_keys_required: bool = False
    closers: list[Any] = field(default_factory=list)
    encoder_model_id: int = 0  # this encoder's row id, registered at start-up
    generator_plugin: str | None = None  # None: no generator configured, generations are refused
    index_state: IndexStateCache = field(default_factory=IndexStateCache)

    def close(self) -> None:
        """Stop the in-process worker (if any) and close the vector index."""
        for closer in reversed(self.closers):
            closer()


def build_services(settings: Settings) -> Services:
    """Open everything an API process needs, per profile: in-process worker when embedded, Celery when not."""
    from indexer.context import build_worker_context

    context = build_worker_context(settings)
    closers: list[Any] = [context.vectors.close]
    if context.lock is not None:
        closers.insert(0, context.lock.close)
    if settings.broker_url:
        from indexer.celery_app import CeleryDispatcher, create_celery_app

        dispatcher: Any = CeleryDispatcher(create_celery_app(settings))
    else:
        from indexer.dispatch import InProcessDispatcher

        dispatcher = InProcessDispatcher(context)
        closers.append(dispatcher.close)
    with context.session_factory.begin() as session:
        encoder_model_id = register_encoder(session, context.encoder_info).id
    return Services(
        encoder_model_id=encoder_model_id,
        generator_plugin=settings.generator_plugin if settings.generator_path else None,
        session_factory=context.session_factory,
        read_session_factory=make_session_factory(context.session_factory.kw["bind"], read_only=True),
        vectors=context.vectors,
        media=context.media,
        dispatcher=dispatcher,
        encoder_info=context.encoder_info,
        allowed_roots=list(settings.allowed_roots),
        query_timeout_s=settings.query_timeout_s,
        api_keys_required=settings.api_keys_required,
        closers=closers,
    )


def _encoder_model_id(session: Session, services: Services) -> int:
    if services.encoder_model_id:
        return services.encoder_model_id
    return metadata.get_encoder_model(session, version=services.encoder_info.version).id


def dispatch(services: Services, plan: PlannedJob | None) -> None:
    """Send a committed plan's shards to the workers."""
    if plan is not None and plan.shard_ids:
        services.dispatcher.submit(plan.kind, plan.shard_ids)


# --- collections and images --------------------------------------------------------------------------


def delete_collection(services: Services, *, collection_id: int) -> None:
    """Delete a collection's vectors, then its rows."""
    with services.session_factory.begin() as session:
        image_ids = metadata.list_image_ids(session, collection_id=collection_id, status="ready")
        metadata.delete_collection(session, collection_id=collection_id)
        for version in services.vectors.list_encoder_versions():
            services.vectors.delete_images(encoder_version=version, image_ids=image_ids)


def delete_image(services: Services, *, image_id: int) -> None:
    """Delete an image's vectors and row (its content-addressed file may be shared and is kept)."""
    with services.session_factory.begin() as session:
        metadata.delete_image(session, image_id=image_id)
        for version in services.vectors.list_encoder_versions():
            services.vectors.delete_images(encoder_version=version, image_ids=[image_id])


def upload_images(
    services: Services, *, collection_id: int, files: Sequence[tuple[str, bytes]]
) -> tuple[list[Any], int | None]:
    """Ingest uploaded files (each fails alone) and index the new ones under the collection's attributes."""
    outcomes = []
    with services.session_factory.begin() as session:
        metadata.get_collection(session, collection_id=collection_id)
    for name, data in files:
        with services.session_factory.begin() as session:
            outcomes.append(ingest_bytes(session, services.media, collection_id=collection_id, source=name, data=data))
    new_ids = [o.image_id for o in outcomes if o.created and o.status == "ready"]
    with services.session_factory.begin() as session:
        plan = plan_index_new_images(
            session,
            collection_id=collection_id,
            image_ids=new_ids,
            encoder_model_id=_encoder_model_id(session, services),
        )
    dispatch(services, plan)
    return outcomes, plan.job_id if plan else None


def ingest_directory(services: Services, *, collection_id: int, path: str) -> PlannedJob:
    """Start an ingest job over a directory inside the allowed roots."""
    with services.session_factory.begin() as session:
        plan = plan_ingest_directory(
            session, collection_id=collection_id, directory=Path(path), allowed_roots=services.allowed_roots
        )
    dispatch(services, plan)
    return plan


def index_attributes(services: Services, *, collection_id: int, attributes: Sequence[str]) -> PlannedJob | None:
    """Start indexing (or backfilling) attributes for a collection; None when all are indexed already."""
    with services.session_factory.begin() as session:
        plan = plan_index_attributes(
            session,
            collection_id=collection_id,
            attribute_texts=attributes,
            encoder_model_id=_encoder_model_id(session, services),
        )
    dispatch(services, plan)
    return plan


def resume(services: Services, *, job_id: int) -> PlannedJob:
    """Dispatch a job's unfinished shards again."""
    with services.session_factory() as session:
        plan = resume_job(session, job_id=job_id)
    dispatch(services, plan)
    return plan


# --- search ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TermRequest:
    """A search term as asked: a stored image id or uploaded bytes, an attribute, a weight."""

    attribute: str
    weight: float = 1.0
    image_id: int | None = None
    image_bytes: bytes | None = None
    vector: np.ndarray | None = None  # the encoded upload, filled in by `search` before its session opens


def _require_indexed(session: Session, services: Services, collection_id: int, attribute: str) -> tuple[int, str]:
    """(attribute id, text) if `collection_id` is indexed under it; otherwise a ConflictError saying what to do."""
    text = metadata.normalize_attribute(attribute)
    encoder_model_id = _encoder_model_id(session, services)
    state = services.index_state.get(session, collection_id=collection_id, encoder_model_id=encoder_model_id)
    if state.get(text, (0, ""))[1] != "ready":  # never fail on a stale cache entry
        state = services.index_state.get(
            session, collection_id=collection_id, encoder_model_id=encoder_model_id, fresh=True
        )
    attribute_id, status = state.get(text, (0, "missing"))
    if status in ("missing", "failed"):
        raise ConflictError(
            f"attribute {text!r} is not indexed for collection {collection_id}; start it with "
            f'POST /api/collections/{collection_id}/attributes {{"attributes": ["{text}"]}} '
            f"(or `omniattr index --collection {collection_id} {text!r}`)"
        )
    if status == "indexing":
        jobs = [
            job
            for job in metadata.list_jobs(session, collection_id=collection_id, status="running")
            + metadata.list_jobs(session, collection_id=collection_id, status="pending")
            if attribute_id in job.params.get("attribute_ids", [])
        ]
        where = f" by job {jobs[0].id} ({jobs[0].done}/{jobs[0].total})" if jobs else ""
        raise ConflictError(f"attribute {text!r} is still being indexed{where}; try again when it is done")
    return attribute_id, text


def _term(
    session: Session, services: Services, collection_id: int, request: TermRequest, images: dict[int, Row]
) -> SearchTerm:
    """The term's query vector; `images` are the term images read up front (a missing one is re-read: 404)."""
    attribute_id, attribute_text = _require_indexed(session, services, collection_id, request.attribute)
    version = services.encoder_info.version
    if request.image_id is not None:
        if request.image_id in images:
            image = images[request.image_id]
        else:
            image = metadata.get_image(session, image_id=request.image_id)  # raises NotFoundError
        if image.collection_id != collection_id:
            _require_indexed(session, services, image.collection_id, request.attribute)
        key = str(point_id(image_id=image.id, attribute_id=attribute_id, encoder_version=version))
        stored = services.vectors.fetch(encoder_version=version, point_ids=[key])
        if key not in stored:
            raise ConflictError(
                f"image {image.id} has no {attribute_text!r} vector yet (status {image.status}); "
                "wait for its indexing job, or search with the image uploaded"
            )
        return SearchTerm(stored[key], attribute_id, attribute_text, request.weight, exclude_image_id=image.id)
    if request.vector is None:
        raise InvalidInputError("each term needs an image_id or an uploaded image")
    return SearchTerm(request.vector, attribute_id, attribute_text, request.weight)


def _encoded(services: Services, term: TermRequest) -> TermRequest:
    if term.image_bytes is None:
        return term
    vector = services.dispatcher.encode_query(
        image_bytes=term.image_bytes,
        attribute=metadata.normalize_attribute(term.attribute),
        timeout=services.query_timeout_s,
    )
    return dataclasses.replace(term, image_bytes=None, vector=np.asarray(vector, dtype=np.float32))


def search(
    services: Services,
    *,
    collection_id: int,
    terms: Sequence[TermRequest],
    negatives: Sequence[TermRequest] = (),
    limit: int = 20,
    filters: dict[str, Any] | None = None,
    include_query_images: bool = False,
) -> list[tuple[RankedImage, Row]]:
    """Ranked images of a collection for weighted positive and negative (image, attribute) terms, with their
    image rows (`metadata.get_image_rows`)."""
    # Uploads are encoded first, so no database connection is held while a worker encodes.
    terms, negatives = ([_encoded(services, t) for t in group] for group in (terms, negatives))
    with services.read_session_factory() as session:  # one snapshot for the whole search
        term_image_ids = [t.image_id for t in (*terms, *negatives) if t.image_id is not None]
        term_images = metadata.get_image_rows(session, image_ids=term_image_ids)  # one query for every term's image
        # A term image of this collection proves that the collection exists (foreign key, same snapshot),
        # which saves a query on the common path; otherwise read it, so a missing collection is a 404 first.
        if not any(image.collection_id == collection_id for image in term_images.values()):
            metadata.get_collection(session, collection_id=collection_id)
        positive = [_term(session, services, collection_id, t, term_images) for t in terms]
        negative = [_term(session, services, collection_id, t, term_images) for t in negatives]
        if include_query_images:
            positive = [SearchTerm(t.vector, t.attribute_id, t.attribute, t.weight) for t in positive]
        ranked = search_images(
            services.vectors,
            encoder_version=services.encoder_info.version,
            collection_id=collection_id,
            terms=positive,
            negatives=negative,
            limit=limit,
            payload_filter=filters or None,
        )
        images = metadata.get_image_rows(session, image_ids=[r.image_id for r in ranked])
    return [(r, images[r.image_id]) for r in ranked if r.image_id in images]


# --- generations -------------------------------------------------------------------------------------


def create_generation(
    services: Services,
    *,
    references: list[Reference],
    prompt: str,
    seed: int | None = None,
    steps: int | None = None,
    guidance_scale: float = 1.0,
) -> int:
    """Record a personalize (one reference) or compose request and start its job; returns its id."""
    with services.session_factory.begin() as session:
        plan, generation_id = plan_generation(
            session,
            references=references,
            prompt=prompt,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            generator_available=services.generator_plugin is not None,
        )
    dispatch(services, plan)
    return generation_id
