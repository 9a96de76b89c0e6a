"""The in-process worker of the embedded profile: the same shard bodies as Celery, on one background thread,
and query encoding on threads of its own. It implements `indexer.context.Dispatcher`.

`StaleWorkSweeper` (both profiles) sends again what no live worker holds and indexes images a crash left
without vectors."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from indexer.context import Dispatcher, PlannedJob, WorkerContext
from indexer.queries import encode_queries
from indexer.work import (
    MAX_SHARD_ATTEMPTS,
    TRANSIENT_ERRORS,
    fail_shard_attempt,
    plan_stale_shards,
    plan_unindexed_images,
    run_shard,
)
from omniattr.domain import ShardKind

log = logging.getLogger(__name__)


# Queries waiting together are encoded together, up to this many: a batch of 4-8 costs the compact encoder
# less per image than one alone (bench/RESULTS.md, "Upload search after the CPU encoding work").
MAX_QUERY_BATCH = 8
# Threads that encode queries. Two batches in flight at once keep both cores busy through the serial parts
# of a forward (Python between ops, small ops that run on one core); the figures against one thread are in
# bench/RESULTS.md.
QUERY_WORKERS = 2
# How long closing waits for a sweep in progress; a daemon thread, it does not hold the process after that.
CLOSE_WAIT_S = 10.0


class QueryBatcher:
    """Encodes query images on `workers` threads, each batching the queries that queued while it was busy."""

    def __init__(self, context: WorkerContext, *, max_batch: int = MAX_QUERY_BATCH, workers: int = QUERY_WORKERS):
        if workers < 1:
            raise ValueError(f"QueryBatcher needs at least one worker thread, got {workers}")
        self.context = context
        self.max_batch = max_batch
        self._queue: queue.Queue[tuple[bytes, str, Future] | None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._work, name=f"omniattr-query-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, image_bytes: bytes, attribute: str) -> Future:
        """Queue one query; the future resolves to its pooled vector or raises its error."""
        future: Future = Future()
        self._queue.put((image_bytes, attribute, future))
        return future

    def close(self) -> None:
        """Stop every worker after the queries already queued."""
        for _ in self._threads:
            self._queue.put(None)  # one stop marker per worker
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:  # whatever queued up meanwhile rides along
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                results = encode_queries(self.context, [(data, attribute) for data, attribute, _ in batch])
            except Exception as error:  # noqa: BLE001 - handed to every waiting caller
                results = [error] * len(batch)
            for (_, _, future), result in zip(batch, results, strict=True):
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
            if stop:
                return


class InProcessDispatcher:
    """Runs submitted shards in order on a daemon thread; failed attempts are retried like Celery's.

    A shard that fails in any way (its collection deleted meanwhile, a failed commit) is logged and recorded as
    failed where the database allows; the thread goes on with the next one. `problem` tells a dead or wedged
    thread to `/api/health`.
    """

    def __init__(self, context: WorkerContext, *, max_attempts: int = MAX_SHARD_ATTEMPTS, wedged_after_s: float = 1800):
        self.context = context
        self.max_attempts = max_attempts
        self.wedged_after_s = wedged_after_s
        self._busy_since: float | None = None  # monotonic start of the shard in hand
        self._queue: queue.Queue[tuple[ShardKind, int, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="omniattr-worker", daemon=True)
        self._thread.start()
        # Queries get their own thread so they never wait behind an indexing shard.
        self._queries = QueryBatcher(context)

    def submit(self, kind: ShardKind, shard_ids: Sequence[int]) -> None:
        """Queue shards; call after the transaction that created them has committed."""
        for shard_id in shard_ids:
            self._queue.put((kind, shard_id, 1))

    def encode_query(self, *, image_bytes: bytes, attribute: str, timeout: float) -> list[float]:
        """Encode a query image under one attribute; TimeoutError after `timeout` seconds."""
        return self._queries.submit(image_bytes, attribute).result(timeout=timeout)

    def problem(self) -> str | None:
        """None while the worker thread lives and is not stuck in one shard for `wedged_after_s`, else why not."""
        if not self._thread.is_alive():
            return "the in-process worker thread has stopped; jobs will not run until omniattr is restarted"
        busy_since = self._busy_since
        if busy_since is not None and time.monotonic() - busy_since > self.wedged_after_s:
            return (
                f"the in-process worker has been on one shard for {time.monotonic() - busy_since:.0f} s "
                f"(over {self.wedged_after_s:.0f} s); it may be stuck, restart omniattr if jobs do not progress"
            )
        return None

    def join(self) -> None:
        """Wait until every queued shard (and the work they queue) has run."""
        self._queue.join()

    def close(self) -> None:
        """Stop the worker thread after the work already queued."""
        self._queue.put(None)
        self._thread.join()
        self._queries.close()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._busy_since = time.monotonic()
                self._run(*item)
            except BaseException:  # noqa: BLE001 - whatever a shard does, the thread lives on to serve the next
                log.exception("shard %s (%s): unexpected error in the worker loop", item[1], item[0])
            finally:
                self._busy_since = None
                self._queue.task_done()
        self._queue.task_done()

    def _run(self, kind: ShardKind, shard_id: int, attempt: int) -> None:
        try:
            run_shard(self.context, kind, shard_id, self)
        except TRANSIENT_ERRORS as error:
            log.warning("shard %s (%s) attempt %s: %s; retrying", shard_id, kind, attempt, error)
            fail_shard_attempt(self.context, shard_id, error, retryable=True)
            if attempt < self.max_attempts:
                self._queue.put((kind, shard_id, attempt + 1))
        except Exception as error:  # noqa: BLE001 - recorded on the shard; the thread keeps serving
            log.exception("shard %s (%s) failed", shard_id, kind)
            fail_shard_attempt(self.context, shard_id, error, retryable=False)


class StaleWorkSweeper:
    """Re-dispatches work that no live worker holds: once at `start`, then every `interval_s` on a daemon thread.

    Each sweep sends again the open shards untouched for `stale_after_s` (never queued because the broker was
    down, or their worker or message was lost). With `resume_all_at_start` (the embedded profile, whose process
    owns every shard, so none can be live elsewhere) the sweep at start resumes every open shard. The thread's
    first sweep also plans index jobs for ready images that lack vectors (a crash between an upload's commits
    and its index job).
    """

    def __init__(
        self,
        context: WorkerContext,
        dispatcher: Dispatcher,
        *,
        stale_after_s: float,
        interval_s: float,
        resume_all_at_start: bool,
    ):
        self.context = context
        self.dispatcher = dispatcher
        self.stale_after_s = stale_after_s
        self.interval_s = interval_s
        self.resume_all_at_start = resume_all_at_start
        self.sweeps = 0  # completed sweeps of the thread, for tests and logs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="omniattr-sweeper", daemon=True)

    def start(self) -> None:
        """Sweep once now (before the caller serves requests, so no new job is taken for a stale one), then
        start the thread."""
        self._guarded(lambda: self.sweep_stale(older_than_s=None if self.resume_all_at_start else self.stale_after_s))
        self._thread.start()

    def sweep_stale(self, *, older_than_s: float | None) -> list[PlannedJob]:
        """Dispatch the open shards untouched for `older_than_s` seconds (every open one when None)."""
        with self.context.session_factory.begin() as session:
            plans = plan_stale_shards(session, older_than_s=older_than_s)
        return self._submit(plans)

    def sweep_unindexed(self) -> list[PlannedJob]:
        """Plan and dispatch index jobs for ready images lacking vectors under their collection's attributes."""
        return self._submit(plan_unindexed_images(self.context, stop=self._stop.is_set))

    def close(self) -> None:
        """Stop sweeping (a sweep in progress finishes first)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=CLOSE_WAIT_S)

    def _submit(self, plans: list[PlannedJob]) -> list[PlannedJob]:
        for plan in plans:
            if plan.shard_ids:
                log.warning("job %s: dispatching %s shards no worker holds", plan.job_id, len(plan.shard_ids))
                self.dispatcher.submit(plan.kind, plan.shard_ids)
        return plans

    def _guarded(self, sweep: Callable[[], object]) -> None:
        try:
            sweep()
        except Exception:  # noqa: BLE001 - the database or broker is down: the next sweep tries again
            log.exception("stale-work sweep failed; retrying in %s s", self.interval_s)

    def _loop(self) -> None:
        self._guarded(self.sweep_unindexed)
        self.sweeps += 1
        while not self._stop.wait(self.interval_s):
            self._guarded(lambda: self.sweep_stale(older_than_s=self.stale_after_s))
            self.sweeps += 1
