"""Jobs and their shard bodies, shared by the Celery tasks and the embedded in-process worker.

Ingest and index live here; generation's planner and shard body live in `indexer.generate`, and `run_shard`
dispatches to all three. The types they share (`WorkerContext`, `Dispatcher`, `PlannedJob`) are in
`indexer.context`, so `generate` never imports this module.

Planning functions run inside the caller's transaction and return shard ids to dispatch *after* commit.
Shard bodies take ids, re-read what they need, skip rows deleted meanwhile, and write idempotently, so a
shard redelivered after a crash simply runs again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from indexer.context import Dispatcher, PlannedJob, WorkerContext
from indexer.generate import run_generate_shard
from indexer.ingest import PathNotAllowed, ingest_path, scan_directory
from indexer.models import EncoderInfo
from indexer.runner import index_images
from omniattr.domain import ImageStatus, IndexStatus, JobKind, JobStatus, ShardKind
from store import metadata
from store.errors import InvalidInputError, NotFoundError, ServiceUnavailableError
from store.tables import utcnow
from store.vectors import point_id

log = logging.getLogger(__name__)

INGEST_SHARD_SIZE = 64  # files: seconds of decode + thumbnail work
INDEX_SHARD_SIZE = 256  # images: a few minutes on a CPU, seconds on a GPU
MAX_SHARD_ATTEMPTS = 3
MAX_ERRORS_KEPT = 20
# Worth another attempt: the database or broker blinked. Anything else is a bug or bad data.
TRANSIENT_ERRORS = (OperationalError, ConnectionError, TimeoutError)


# --- planning (inside the caller's transaction) ------------------------------------------------------


def register_encoder(session: Session, info: EncoderInfo) -> metadata.EncoderModel:
    """Record the encoder checkpoint in use (idempotent)."""
    return metadata.register_encoder_model(
        session,
        name=info.name,
        version=info.version,
        backend=info.backend,
        dimension=info.dimension,
        checkpoint_sha256=info.checkpoint_sha256,
    )


def _split(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def plan_ingest_directory(
    session: Session,
    *,
    collection_id: int,
    directory: Path,
    allowed_roots: Sequence[Path],
    shard_size: int = INGEST_SHARD_SIZE,
) -> PlannedJob:
    """Scan a directory (inside the allowed roots) into an ingest job of file-path shards."""
    metadata.get_collection(session, collection_id=collection_id)
    found = list(scan_directory(directory, allowed_roots))
    # Refused symlinks go into the shards too: the shard records them as failures with the reason.
    paths = [str(path) for path, _ in found]
    job = metadata.create_job(
        session,
        kind=JobKind.INGEST,
        collection_id=collection_id,
        params={"directory": str(directory)},
        shards=_split(paths, shard_size),
    )
    return PlannedJob(job.id, JobKind.INGEST.shard_kind, [shard.id for shard in job.shards])


def plan_index_attributes(
    session: Session,
    *,
    collection_id: int,
    attribute_texts: Sequence[str],
    encoder_model_id: int,
    shard_size: int = INDEX_SHARD_SIZE,
) -> PlannedJob | None:
    """Index a collection under attributes it is not yet indexed for (a backfill); None if nothing is new."""
    metadata.get_collection(session, collection_id=collection_id)
    if not attribute_texts:
        raise InvalidInputError("no attributes given; name at least one, e.g. 'lighting'")
    attributes = list(
        {a.id: a for a in (metadata.get_or_create_attribute(session, text=t) for t in attribute_texts)}.values()
    )
    existing = {
        row.attribute_id: row.status
        for row in metadata.list_collection_attributes(
            session, collection_id=collection_id, encoder_model_id=encoder_model_id
        )
    }
    # An attribute left `indexing` by a job that is over (cancelled, or lost before its status was set) is
    # planned again, so a repost never answers "already being indexed" forever.
    in_progress = {
        attribute_id
        for job in metadata.open_index_jobs(session, collection_id=collection_id, encoder_model_id=encoder_model_id)
        if job.kind == JobKind.INDEX
        for attribute_id in job.params.get("attribute_ids", [])
    }
    new = [
        a
        for a in attributes
        if existing.get(a.id) != IndexStatus.READY
        and not (existing.get(a.id) == IndexStatus.INDEXING and a.id in in_progress)
    ]
    if not new:
        return None
    for attribute in new:
        metadata.set_collection_attribute(
            session,
            collection_id=collection_id,
            attribute_id=attribute.id,
            encoder_model_id=encoder_model_id,
            status=IndexStatus.INDEXING,
        )
    image_ids = metadata.list_image_ids(session, collection_id=collection_id)
    return _create_index_job(
        session, collection_id, encoder_model_id, [a.id for a in new], image_ids, shard_size, kind=JobKind.INDEX
    )


def plan_index_new_images(
    session: Session,
    *,
    collection_id: int,
    image_ids: Sequence[int],
    encoder_model_id: int,
    shard_size: int = INDEX_SHARD_SIZE,
) -> PlannedJob | None:
    """Index newly ingested images under every attribute already indexed for their collection."""
    attribute_ids = [
        row.attribute_id
        for row in metadata.list_collection_attributes(
            session, collection_id=collection_id, encoder_model_id=encoder_model_id
        )
        if row.status in (IndexStatus.READY, IndexStatus.INDEXING)
    ]
    if not attribute_ids or not image_ids:
        return None
    return _create_index_job(
        session,
        collection_id,
        encoder_model_id,
        attribute_ids,
        list(image_ids),
        shard_size,
        kind=JobKind.INDEX_NEW_IMAGES,
    )


def _create_index_job(
    session: Session,
    collection_id: int,
    encoder_model_id: int,
    attribute_ids: list[int],
    image_ids: list[int],
    shard_size: int,
    *,
    kind: JobKind,
) -> PlannedJob:
    job = metadata.create_job(
        session,
        kind=kind,
        collection_id=collection_id,
        encoder_model_id=encoder_model_id,
        params={"attribute_ids": attribute_ids},
        shards=_split(image_ids, shard_size),
        units_per_item=len(attribute_ids),
    )
    if job.status == JobStatus.DONE:  # an empty collection: the attributes are trivially ready
        _mark_attributes(session, job, IndexStatus.READY)
    return PlannedJob(job.id, kind.shard_kind, [shard.id for shard in job.shards])


def _mark_attributes(session: Session, job: metadata.Job, status: IndexStatus) -> None:
    for attribute_id in job.params.get("attribute_ids", []):
        metadata.set_collection_attribute(
            session,
            collection_id=job.collection_id,
            attribute_id=attribute_id,
            encoder_model_id=job.encoder_model_id,
            status=status,
        )


def resume_job(session: Session, *, job_id: int) -> PlannedJob:
    """The unfinished shards of a job, to dispatch again (after a crash or a lost broker)."""
    job = metadata.get_job(session, job_id=job_id)
    kind = JobKind(job.kind).shard_kind
    return PlannedJob(job.id, kind, [shard.id for shard in metadata.unfinished_shards(session, job_id=job_id)])


def plan_stale_shards(session: Session, *, older_than_s: float | None) -> list[PlannedJob]:
    """Open shards of open jobs untouched for `older_than_s` seconds (all when None), to dispatch again.

    Their shards are marked as just dispatched, so the next sweep waits the timeout again. Running them twice
    is safe: shard bodies skip finished shards and write idempotently.
    """
    cutoff = None if older_than_s is None else utcnow() - timedelta(seconds=older_than_s)
    by_job: dict[int, list[int]] = {}
    kinds: dict[int, ShardKind] = {}
    for shard in metadata.stale_shards(session, updated_before=cutoff):
        by_job.setdefault(shard.job_id, []).append(shard.id)
        kinds[shard.job_id] = JobKind(shard.job.kind).shard_kind
    metadata.touch_shards(session, shard_ids=[shard_id for ids in by_job.values() for shard_id in ids])
    return [PlannedJob(job_id, kinds[job_id], ids) for job_id, ids in by_job.items()]


def plan_unindexed_images(
    context: WorkerContext, *, chunk: int = 512, stop: Callable[[], bool] = lambda: False
) -> list[PlannedJob]:
    """Index jobs for ready images that lack a vector (or hold a stale one) under an attribute indexed for their
    collection and that no open index job covers: what a crash between an upload's commits and its index job
    left behind. Commits its own transactions; dispatch the result. `stop` is asked between collections."""
    with context.session_factory() as session:
        try:
            encoder_model_id = metadata.get_encoder_model(session, version=context.encoder_info.version).id
        except NotFoundError:
            return []
        todo = {}
        for collection_id in metadata.indexed_collection_ids(session, encoder_model_id=encoder_model_id):
            covered = {
                item
                for job in metadata.open_index_jobs(
                    session, collection_id=collection_id, encoder_model_id=encoder_model_id
                )
                for shard in job.shards
                for item in shard.items
            }
            ready = metadata.list_image_ids(session, collection_id=collection_id)
            todo[collection_id] = [image_id for image_id in ready if image_id not in covered]
    plans = []
    for collection_id, image_ids in todo.items():
        if stop():  # the process is shutting down: the next start sweeps again
            break
        missing = [
            image_id
            for start in range(0, len(image_ids), chunk)
            for image_id in _images_missing_vectors(context, image_ids[start : start + chunk], collection_id)
        ]
        if not missing:
            continue
        with context.session_factory.begin() as session:
            try:
                plan = plan_index_new_images(
                    session, collection_id=collection_id, image_ids=missing, encoder_model_id=encoder_model_id
                )
            except NotFoundError:  # deleted meanwhile
                continue
        if plan is not None:
            log.warning("collection %s: %s ready images lacked vectors; indexing them", collection_id, len(missing))
            plans.append(plan)
    return plans


# --- shard bodies (run by a worker) ------------------------------------------------------------------


def errors_text(errors: Sequence[str]) -> str | None:
    """A shard's errors as one text, the first `MAX_ERRORS_KEPT` of them; None when there were none."""
    if not errors:
        return None
    kept = list(errors[:MAX_ERRORS_KEPT])
    if len(errors) > MAX_ERRORS_KEPT:
        kept.append(f"... and {len(errors) - MAX_ERRORS_KEPT} more")
    return "\n".join(kept)


def run_ingest_shard(context: WorkerContext, shard_id: int, dispatcher: Dispatcher | None = None) -> str:
    """Ingest one shard of file paths, then index its new images under the collection's attributes."""
    with context.session_factory.begin() as session:
        shard = metadata.start_shard(session, shard_id=shard_id)
        if shard is None:
            return "skipped"
        paths, job_id, collection_id = list(shard.items), shard.job_id, shard.job.collection_id
    done, failed, errors, ready_ids = 0, 0, [], []
    for path in paths:
        with context.session_factory.begin() as session:
            try:
                outcome = ingest_path(
                    session,
                    context.media,
                    collection_id=collection_id,
                    path=Path(path),
                    allowed_roots=context.allowed_roots,
                )
            except (PathNotAllowed, OSError) as error:
                failed += 1
                errors.append(f"{path}: {error}")
                continue
            except NotFoundError:  # the collection was deleted meanwhile: nothing more to do
                return "collection deleted"
        if outcome.status == ImageStatus.READY:
            done += 1
            ready_ids.append(outcome.image_id)
        else:
            failed += 1
            errors.append(f"{path}: {outcome.error}")
    # Checked against the vectors rather than "created now", so a shard redelivered after a crash between
    # ingest and this point still indexes what the first attempt ingested.
    missing = _images_missing_vectors(context, ready_ids, collection_id)
    with context.session_factory.begin() as session:
        metadata.finish_shard(session, shard_id=shard_id, done=done, failed=failed, error=errors_text(errors))
        follow_up = None
        if missing:
            follow_up = plan_index_new_images(
                session,
                collection_id=collection_id,
                image_ids=missing,
                encoder_model_id=metadata.get_encoder_model(session, version=context.encoder_info.version).id,
            )
    if follow_up and dispatcher is not None:
        try:
            dispatcher.submit(follow_up.kind, follow_up.shard_ids)
        except ServiceUnavailableError as error:  # the job is committed: the stale-job sweeper sends it later
            log.warning("index job %s planned but not queued: %s", follow_up.job_id, error)
    log.info("ingest shard %s of job %s: %s ready, %s failed", shard_id, job_id, done, failed)
    return "done"


def _images_missing_vectors(context: WorkerContext, image_ids: Sequence[int], collection_id: int) -> list[int]:
    """Those of `image_ids` lacking a vector for some attribute indexed for the collection, or holding one that
    encodes other content (its payload's sha256 is not the image row's)."""
    version = context.encoder_info.version
    with context.session_factory() as session:
        try:
            encoder_model = metadata.get_encoder_model(session, version=version)
        except NotFoundError:
            return []  # this encoder never indexed anything: no attributes to keep up to date
        attribute_ids = [
            row.attribute_id
            for row in metadata.list_collection_attributes(
                session, collection_id=collection_id, encoder_model_id=encoder_model.id
            )
        ]
        sha256 = {image_id: row.sha256 for image_id, row in metadata.get_images(session, image_ids=image_ids).items()}
    if not attribute_ids or not image_ids:
        return []
    wanted = {
        image_id: [str(point_id(image_id=image_id, attribute_id=a, encoder_version=version)) for a in attribute_ids]
        for image_id in image_ids
        if image_id in sha256  # deleted meanwhile: nothing to index
    }
    present = context.vectors.fetch_payloads(
        encoder_version=version, point_ids=[p for ids in wanted.values() for p in ids]
    )
    return [
        image_id
        for image_id, ids in wanted.items()
        if not all(p in present and present[p].get("sha256") == sha256[image_id] for p in ids)
    ]


def run_index_shard(context: WorkerContext, shard_id: int) -> str:
    """Encode one shard's images under the job's attributes and upsert the vectors."""
    with context.session_factory.begin() as session:
        shard = metadata.start_shard(session, shard_id=shard_id)
        if shard is None:
            return "skipped"
        job = shard.job
        image_ids = list(shard.items)
        attribute_ids = list(job.params["attribute_ids"])
        attributes = [(a, metadata.get_attribute(session, attribute_id=a).text) for a in attribute_ids]
        encoder_model = session.get(metadata.EncoderModel, job.encoder_model_id)
        encoder_version, dimension = encoder_model.version, encoder_model.dimension
    if encoder_version != context.encoder_info.version:
        raise InvalidInputError(
            f"job {job.id} was planned for encoder {encoder_version}, but this worker runs "
            f"{context.encoder_info.version}; start a worker with that checkpoint"
        )
    context.vectors.ensure_collection(encoder_version=encoder_version, dimension=dimension)
    result = index_images(
        session_factory=context.session_factory,
        media=context.media,
        vectors=context.vectors,
        encoder=context.encoder.get(),
        encoder_version=encoder_version,
        image_ids=image_ids,
        attributes=attributes,
        batch_size=context.index_batch_size,
    )
    # Checked after the write: a delete that committed before this read is seen here and its images' points go
    # (the deleting request may have removed the vectors before ours landed); one that commits later removes
    # them itself, after its commit.
    with context.session_factory() as session:
        gone = set(image_ids) - set(metadata.get_images(session, image_ids=image_ids))
    if gone:
        context.vectors.delete_images(encoder_version=encoder_version, image_ids=gone)
    with context.session_factory.begin() as session:
        if session.get(metadata.JobShard, shard_id) is None:
            log.info("index shard %s: its collection was deleted meanwhile", shard_id)
            return "collection deleted"
        # Images deleted (or failed) since planning need no work: they count as done so progress reaches 100%.
        skipped = len(image_ids) * len(attributes) - result.done - result.failed
        finished = metadata.finish_shard(
            session,
            shard_id=shard_id,
            done=result.done + skipped,
            failed=result.failed,
            error=errors_text(result.errors),
        )
        if finished.status in (JobStatus.DONE, JobStatus.FAILED):
            ready = finished.status == JobStatus.DONE
            _mark_attributes(session, finished, IndexStatus.READY if ready else IndexStatus.FAILED)
    if finished.status == JobStatus.DONE:
        # After the commit: building HNSW takes tens of seconds, and on SQLite an open write transaction
        # would block every other writer meanwhile. Searches stay exact on unindexed points until it is built.
        context.vectors.optimize(encoder_version=encoder_version)
    t = result.times
    log.info(
        "index shard %s: %s encodings (read %.2fs, encode %.2fs, write %.2fs)",
        shard_id,
        result.done,
        t.read,
        t.encode,
        t.write,
    )
    return "done"


def fail_shard_attempt(context: WorkerContext, shard_id: int, error: BaseException, *, retryable: bool) -> bool:
    """Record a failed attempt: back to pending while a retryable error has tries left, else failed for good.

    Never raises (it runs in a worker's error path): a shard deleted with its collection has nothing to record,
    and when the database itself fails the shard stays open for the stale-job sweeper. True if recorded.
    """
    try:
        with context.session_factory.begin() as session:
            metadata.fail_shard(
                session,
                shard_id=shard_id,
                error=f"{type(error).__name__}: {error}",
                max_attempts=MAX_SHARD_ATTEMPTS if retryable else 0,
            )
        return True
    except NotFoundError:
        log.info("shard %s is gone (its collection was deleted); nothing to record", shard_id)
    except Exception:  # noqa: BLE001 - e.g. the database is down or full; logged, the sweeper retries later
        log.exception("could not record the failure of shard %s", shard_id)
    return False


def run_shard(context: WorkerContext, kind: ShardKind, shard_id: int, dispatcher: Dispatcher | None = None) -> str:
    """Run a shard id's body, chosen by shard kind."""
    bodies: dict[ShardKind, Callable[[], str]] = {
        ShardKind.INGEST: lambda: run_ingest_shard(context, shard_id, dispatcher),
        ShardKind.INDEX: lambda: run_index_shard(context, shard_id),
        ShardKind.GENERATE: lambda: run_generate_shard(context, shard_id),
    }
    if kind not in bodies:
        raise InvalidInputError(f"unknown shard kind {kind!r}; expected one of {sorted(bodies)}")
    return bodies[kind]()
