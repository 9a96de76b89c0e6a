"""Jobs: status and progress, resume and cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api import schemas, services
from api.deps import ReadSessionDep, ServicesDep, SessionDep
from api.routes.views import job_public
from api.schemas import PathId
from store import metadata

router = APIRouter(prefix="/api/jobs", tags=["jobs"])


@router.get("", response_model=schemas.JobsPublic)
def list_jobs(
    session: ReadSessionDep,
    collection_id: schemas.QueryId | None = None,
    status: Annotated[str | None, Query(pattern="^(pending|running|done|failed|cancelled)$")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> schemas.JobsPublic:
    """Newest jobs first."""
    jobs = metadata.list_jobs(session, collection_id=collection_id, status=status, limit=limit)
    return schemas.JobsPublic(data=[job_public(session, j) for j in jobs], count=len(jobs))


@router.get("/{job_id}", response_model=schemas.JobPublic)
def get_job(job_id: PathId, session: ReadSessionDep) -> schemas.JobPublic:
    """A job's status and progress (done, failed, total, rate, ETA)."""
    return job_public(session, metadata.get_job(session, job_id=job_id))


@router.post("/{job_id}/resume", response_model=schemas.JobPublic)
def resume_job(job_id: PathId, services_: ServicesDep) -> schemas.JobPublic:
    """Dispatch a job's unfinished shards again (after workers were lost)."""
    services.resume(services_, job_id=job_id)
    with services_.session_factory() as session:
        return job_public(session, metadata.get_job(session, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=schemas.JobPublic)
def cancel_job(job_id: PathId, session: SessionDep) -> schemas.JobPublic:
    """Stop a job: shards not yet started are skipped."""
    return job_public(session, metadata.cancel_job(session, job_id=job_id))
