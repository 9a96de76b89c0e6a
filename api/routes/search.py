"""Attribute-conditioned search by stored image ids or an uploaded image."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile
from sqlalchemy import Row

from api import schemas
from api.deps import ServicesDep
from api.routes.views import image_public
from api.usecases import search as search_cases
from api.usecases.search import TermRequest
from omniattr.domain import MAX_ATTRIBUTE_CHARS, MAX_SEARCH_RESULTS
from store.search import RankedImage

router = APIRouter(prefix="/api/search", tags=["search"])


def _results(ranked: list[tuple[RankedImage, Row]], started: float) -> Response:
    """The SearchResults JSON, serialised once (the hot path skips FastAPI's re-validation of the model)."""
    results = schemas.SearchResults(
        results=[
            schemas.SearchHitPublic(
                image=image_public(image),
                score=round(hit.score, 6),
                attribute_scores=hit.attribute_scores,
                negative_scores=hit.negative_scores,
            )
            for hit, image in ranked
        ],
        took_ms=round((time.perf_counter() - started) * 1000, 2),
    )
    return Response(results.model_dump_json(), media_type="application/json")


@router.post("", response_model=schemas.SearchResults)
def search(body: schemas.SearchRequest, services: ServicesDep) -> Response:
    """Rank a collection by one or several weighted (image, attribute) terms, minus negative terms."""
    # A plain `def`: FastAPI runs it in its thread pool. It reads the database, and a slow or hung database
    # must hold only this request, never the event loop that serves every other one (/api/health included).
    started = time.perf_counter()
    ranked = search_cases.search(
        services,
        collection_id=body.collection_id,
        terms=[TermRequest(t.attribute, t.weight, image_id=t.image_id) for t in body.terms],
        negatives=[TermRequest(t.attribute, t.weight, image_id=t.image_id) for t in body.negatives],
        limit=body.limit,
        filters=body.filters,
        include_query_images=body.include_query_images,
    )
    return _results(ranked, started)


@router.post("/upload", response_model=schemas.SearchResults)
def search_by_upload(
    services: ServicesDep,
    image: Annotated[UploadFile, File(description="The query image.")],
    collection_id: Annotated[int, Form(ge=1, le=schemas.MAX_ID)],
    attribute: Annotated[str, Form(min_length=1, max_length=MAX_ATTRIBUTE_CHARS)],
    limit: Annotated[int, Form(ge=1, le=MAX_SEARCH_RESULTS)] = 20,
) -> Response:
    """Rank a collection by an uploaded image's embedding under one attribute."""
    started = time.perf_counter()
    term = TermRequest(attribute, image_bytes=image.file.read())
    ranked = search_cases.search(services, collection_id=collection_id, terms=[term], limit=limit)
    return _results(ranked, started)
