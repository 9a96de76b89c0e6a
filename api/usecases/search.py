"""Search: rank a collection's images by weighted (image, attribute) terms, minus negative terms."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Row
from sqlalchemy.orm import Session

from api.usecases.context import Services, encoder_model_id
from omniattr.domain import IndexStatus, JobStatus
from store import metadata
from store.errors import ConflictError, InvalidInputError
from store.search import RankedImage, SearchTerm, search_images
from store.vectors import point_id


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
    model_id = encoder_model_id(session, services)
    state = services.index_state.get(session, collection_id=collection_id, encoder_model_id=model_id)
    if state.get(text, (0, None))[1] != IndexStatus.READY:  # never fail on a stale cache entry
        state = services.index_state.get(session, collection_id=collection_id, encoder_model_id=model_id, fresh=True)
    attribute_id, status = state.get(text, (0, None))
    if status is None or status == IndexStatus.FAILED:
        raise ConflictError(
            f"attribute {text!r} is not indexed for collection {collection_id}; start it with "
            f'POST /api/collections/{collection_id}/attributes {{"attributes": ["{text}"]}} '
            f"(or `omniattr index --collection {collection_id} {text!r}`)"
        )
    if status == IndexStatus.INDEXING:
        jobs = [
            job
            for job in metadata.list_jobs(session, collection_id=collection_id, status=JobStatus.RUNNING)
            + metadata.list_jobs(session, collection_id=collection_id, status=JobStatus.PENDING)
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
    """The term with its uploaded image encoded by the dispatcher (the workers' encoder), if it has one."""
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
    uploads = [t for t in (*terms, *negatives) if t.image_bytes is not None]
    if uploads:  # a missing collection or an unindexed attribute is refused before a worker spends an encoding
        with services.read_session_factory() as session:
            metadata.get_collection(session, collection_id=collection_id)
            for term in uploads:
                _require_indexed(session, services, collection_id, term.attribute)
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
