"""Jobs: their progress, resume and cancel."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from api.usecases.context import Services, dispatch
from indexer.work import resume_job as plan_resume
from omniattr.domain import JobStatus
from store import metadata
from store.tables import Job


@dataclass(frozen=True)
class JobDetail:
    """A job row and its progress, read in one session."""

    job: Job
    progress: metadata.JobProgress


def job_detail(session: Session, job: Job) -> JobDetail:
    """`job` with its progress read in the caller's session (for use cases that create or change jobs)."""
    return JobDetail(job, metadata.job_progress(session, job_id=job.id))


def list_jobs(
    services: Services, *, collection_id: int | None = None, status: JobStatus | None = None, limit: int = 50
) -> list[JobDetail]:
    """Newest jobs first, optionally of one collection or one status."""
    with services.read_session_factory() as session:
        jobs = metadata.list_jobs(session, collection_id=collection_id, status=status, limit=limit)
        return [job_detail(session, job) for job in jobs]


def get_job(services: Services, *, job_id: int) -> JobDetail:
    """One job and its progress."""
    with services.read_session_factory() as session:
        return job_detail(session, metadata.get_job(session, job_id=job_id))


def resume_job(services: Services, *, job_id: int) -> JobDetail:
    """Dispatch a job's unfinished shards again (after workers were lost)."""
    with services.session_factory() as session:
        plan = plan_resume(session, job_id=job_id)
        detail = job_detail(session, metadata.get_job(session, job_id=job_id))
    dispatch(services, plan)
    return detail


def cancel_job(services: Services, *, job_id: int) -> JobDetail:
    """Stop a job: shards not yet started are skipped."""
    with services.session_factory.begin() as session:
        return job_detail(session, metadata.cancel_job(session, job_id=job_id))
