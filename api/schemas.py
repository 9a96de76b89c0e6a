"""Request and response schemas: a family per resource (XCreate / XPublic / XsPublic). Tables are never
serialised directly."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field

from omniattr.domain import (
    DEFAULT_BASE_STRENGTH,
    DEFAULT_KEEP_DETAIL,
    MAX_ATTRIBUTE_CHARS,
    MAX_KEEP_DETAIL,
    MAX_NAME_CHARS,
    MAX_REFERENCES,
    MAX_SEARCH_RESULTS,
    MAX_SEARCH_TERMS,
    GenerationStatus,
    ImageStatus,
    IndexStatus,
    JobKind,
    JobStatus,
)

Attribute = Annotated[str, Field(min_length=1, max_length=MAX_ATTRIBUTE_CHARS, examples=["lighting"])]
MAX_ID = 2_147_483_647  # ids are 32-bit integer columns
Id = Annotated[int, Field(ge=1, le=MAX_ID)]
PathId = Annotated[int, Path(ge=1, le=MAX_ID)]
QueryId = Annotated[int, Query(ge=1, le=MAX_ID)]


class CollectionCreate(BaseModel):
    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS, examples=["holiday photos"])
    description: str = Field(default="", max_length=2000)


class AttributeState(BaseModel):
    attribute: str
    status: IndexStatus


class CollectionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    description: str
    created_at: datetime
    image_count: int = 0
    failed_count: int = 0
    attributes: list[AttributeState] = []


class CollectionsPublic(BaseModel):
    data: list[CollectionPublic]
    count: int


class ImagePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    collection_id: int
    source: str
    sha256: str
    width: int | None
    height: int | None
    format: str | None
    bytes: int
    status: ImageStatus
    error: str | None
    thumbnail_url: str
    created_at: datetime


class ImagesPublic(BaseModel):
    data: list[ImagePublic]
    count: int
    next_after_id: int | None = Field(description="Pass as after_id for the next page; null on the last page.")


class UploadResult(BaseModel):
    source: str
    image_id: int
    created: bool
    status: ImageStatus
    error: str | None = None


class UploadReport(BaseModel):
    results: list[UploadResult]
    index_job_id: int | None = Field(
        default=None, description="The job indexing the new images under the collection's attributes, if any."
    )


class IngestPathRequest(BaseModel):
    path: str = Field(min_length=1, max_length=4096, description="A directory inside the server's allowed roots.")


class AttributesRequest(BaseModel):
    attributes: list[Attribute] = Field(min_length=1, max_length=16)


class JobPublic(BaseModel):
    id: int
    kind: JobKind
    status: JobStatus
    collection_id: int | None
    done: int
    failed: int
    total: int
    shards_done: int
    shards_total: int
    rate: float | None = Field(description="Units per second since the job started.")
    eta_seconds: float | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class IndexResponse(BaseModel):
    job: JobPublic | None
    detail: str


class SearchTermIn(BaseModel):
    image_id: Id = Field(description="A stored image whose vector under `attribute` is the query.")
    attribute: Attribute
    weight: float = Field(default=1.0, gt=0, le=100)


class SearchRequest(BaseModel):
    collection_id: Id
    terms: list[SearchTermIn] = Field(min_length=1, max_length=MAX_SEARCH_TERMS)
    negatives: list[SearchTermIn] = Field(default=[], max_length=MAX_SEARCH_TERMS - 1)  # terms and negatives share it
    limit: int = Field(default=20, ge=1, le=MAX_SEARCH_RESULTS)
    filters: dict[str, str | int | float | bool | list[str | int]] = Field(
        default={}, description='Exact-match filters on the vector payload, e.g. {"format": "PNG"}.'
    )
    include_query_images: bool = Field(default=False, description="Keep the query images in the results.")


class SearchHitPublic(BaseModel):
    image: ImagePublic
    score: float
    attribute_scores: dict[str, float]
    negative_scores: dict[str, float] = {}


class SearchResults(BaseModel):
    results: list[SearchHitPublic]
    took_ms: float


class GenerationReference(BaseModel):
    image_id: Id
    attribute: Attribute
    weight: float = Field(default=1.0, gt=0, le=10)


class GenerationCreate(BaseModel):
    refs: list[GenerationReference] = Field(
        min_length=1, max_length=MAX_REFERENCES, description="One: personalize; more: compose."
    )
    prompt: str = Field(min_length=1, max_length=1000, examples=["a cup on a wooden table"])
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    steps: int | None = Field(default=None, ge=1, le=200)
    guidance_scale: float = Field(default=1.0, ge=0, le=30, description="Text guidance s_c; 1 disables it.")
    base_image_id: Id | None = Field(
        default=None,
        description="Apply to my image: start from this stored image instead of noise "
        "(or upload the base with POST /api/generations/upload).",
    )
    strength: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description=f"With a base image: how much of the schedule runs from it, in (0, 1]; small keeps the base, "
        f"1 starts from noise. Default {DEFAULT_BASE_STRENGTH}.",
    )
    keep_detail: float | None = Field(
        default=None,
        ge=0,
        le=MAX_KEEP_DETAIL,
        description=f"With a base image: keep its detail finer than this blur sigma, in output pixels (the output "
        f"is blur(generated) + base - blur(base)); 0 returns the generator's output as is. Default "
        f"{DEFAULT_KEEP_DETAIL}, or 0 when a reference's attribute names a style or a texture (e.g. 'art style'): "
        f"the base's detail would replace that texture.",
    )


class GenerationPublic(BaseModel):
    id: int
    job_id: int | None
    status: GenerationStatus
    request: dict[str, Any]
    output_url: str | None
    transfer_scores: dict[str, float]
    error: str | None
    created_at: datetime


class HealthPublic(BaseModel):
    status: str = Field(description="ok, or degraded when the workers cannot run jobs (then HTTP 503).")
    worker: str = Field(default="ok", description="ok, or what is wrong with the workers.")
    profile: str
    encoder_version: str
    generator: str | None = Field(description="The generator plugin in use, or null when generation is off.")
    version: str
