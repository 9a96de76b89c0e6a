"""Jobs: status and progress, resume and cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api import schemas
from api.deps import ServicesDep
from api.routes.views import job_public
from api.schemas import PathId
from api.usecases import jobs
from omniattr.domain import JobStatus

router = APIRouter(prefix="/api/jobs", tags=["jobs"])


@router.get("", response_model=schemas.JobsPublic)
def list_jobs(
    services: ServicesDep,
    collection_id: schemas.QueryId | None = None,
    status: Annotated[JobStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> schemas.JobsPublic:
    """Newest jobs first."""
    details = jobs.list_jobs(services, collection_id=collection_id, status=status, limit=limit)
    return schemas.JobsPublic(data=[job_public(d) for d in details], count=len(details))


@router.get("/{job_id}", response_model=schemas.JobPublic)
def get_job(job_id: PathId, services: ServicesDep) -> schemas.JobPublic:
    """A job's status and progress (done, failed, total, rate, ETA)."""
    return job_public(jobs.get_job(services, job_id=job_id))


@router.post("/{job_id}/resume", response_model=schemas.JobPublic)
def resume_job(job_id: PathId, services: ServicesDep) -> schemas.JobPublic:
    """Dispatch a job's unfinished shards again (after workers were lost)."""
    return job_public(jobs.resume_job(services, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=schemas.JobPublic)
def cancel_job(job_id: PathId, services: ServicesDep) -> schemas.JobPublic:
    """Stop a job: shards not yet started are skipped."""
    return job_public(jobs.cancel_job(services, job_id=job_id))
