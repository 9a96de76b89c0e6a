"""Collections: create, read, delete, and the attributes they are indexed under."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from api.usecases.context import Services, dispatch, encoder_model_id, ensure_database_space
from api.usecases.jobs import JobDetail, job_detail
from indexer.context import PlannedJob
from indexer.work import plan_index_attributes
from omniattr.domain import ImageStatus, IndexStatus, JobKind, ShardStatus
from store import metadata
from store.tables import Collection


@dataclass(frozen=True)
class AttributeIndexState:
    """An attribute indexed (or being indexed) for a collection, and its status."""

    attribute: str
    status: IndexStatus


@dataclass(frozen=True)
class CollectionDetail:
    """A collection row with its image counts and attribute states, read in one session."""

    collection: Collection
    image_count: int
    failed_count: int
    attributes: list[AttributeIndexState]


def _detail(session: Session, collection: Collection) -> CollectionDetail:
    states = metadata.list_collection_attributes(session, collection_id=collection.id)
    return CollectionDetail(
        collection=collection,
        image_count=metadata.count_images(session, collection_id=collection.id, status=ImageStatus.READY),
        failed_count=metadata.count_images(session, collection_id=collection.id, status=ImageStatus.FAILED),
        attributes=[AttributeIndexState(s.attribute.text, IndexStatus(s.status)) for s in states],
    )


def create_collection(services: Services, *, name: str, description: str = "") -> CollectionDetail:
    """Create an empty collection."""
    with services.session_factory.begin() as session:
        return _detail(session, metadata.create_collection(session, name=name, description=description))


def list_collections(services: Services, *, offset: int = 0, limit: int = 100) -> list[CollectionDetail]:
    """A page of collections with their image counts and attributes."""
    with services.read_session_factory() as session:
        return [_detail(session, c) for c in metadata.list_collections(session, offset=offset, limit=limit)]


def get_collection(services: Services, *, collection_id: int) -> CollectionDetail:
    """One collection with its image counts and attributes."""
    with services.read_session_factory() as session:
        return _detail(session, metadata.get_collection(session, collection_id=collection_id))


def delete_collection(services: Services, *, collection_id: int) -> None:
    """Delete a collection's rows, then every vector of it.

    The vectors go after the commit and by collection, so a shard of a running index job that wrote before the
    commit loses its points here, and one that writes after it finds its images gone and removes its own
    (`indexer.work.run_index_shard`). Collection ids are never reused, so nothing left can be mistaken.
    """
    with services.session_factory.begin() as session:
        metadata.delete_collection(session, collection_id=collection_id)
    for version in services.vectors.list_encoder_versions():
        services.vectors.delete_collection(encoder_version=version, collection_id=collection_id)


def index_attributes(services: Services, *, collection_id: int, attributes: Sequence[str]) -> JobDetail | None:
    """Start indexing (or backfilling) attributes for a collection; None when all are indexed already."""
    ensure_database_space(services)
    with services.session_factory.begin() as session:
        model_id = encoder_model_id(session, services)
        plan = plan_index_attributes(
            session, collection_id=collection_id, attribute_texts=attributes, encoder_model_id=model_id
        )
        if plan is None:
            # Already being indexed: send again the shards of that job that never started (their dispatch may
            # have failed with the broker down), so a repost is how a user retries. Running twice is harmless.
            plan = _unstarted_index_shards(session, collection_id, attributes, model_id)
        detail = job_detail(session, metadata.get_job(session, job_id=plan.job_id)) if plan else None
    dispatch(services, plan)
    return detail


def _unstarted_index_shards(
    session: Session, collection_id: int, attributes: Sequence[str], model_id: int
) -> PlannedJob | None:
    wanted = {a.id for text in attributes if (a := metadata.find_attribute(session, text=text)) is not None}
    for job in metadata.open_index_jobs(session, collection_id=collection_id, encoder_model_id=model_id):
        if job.kind == JobKind.INDEX and wanted & set(job.params.get("attribute_ids", [])):
            shards = [s.id for s in job.shards if s.status == ShardStatus.PENDING and s.attempts == 0]
            if shards:
                return PlannedJob(job.id, JobKind(job.kind).shard_kind, shards)
    return None
