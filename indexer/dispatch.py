"""The in-process worker of the embedded profile: the same shard bodies as Celery, on one background thread,
and query encoding on threads of its own. It implements `indexer.context.Dispatcher`."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future

from indexer.context import WorkerContext
from indexer.queries import encode_queries
from indexer.work import MAX_SHARD_ATTEMPTS, TRANSIENT_ERRORS, fail_shard_attempt, run_shard
from omniattr.domain import ShardKind

log = logging.getLogger(__name__)


# Queries waiting together are encoded together, up to this many: a batch of 4-8 costs the compact encoder
# less per image than one alone (bench/RESULTS.md, "Upload search after the CPU encoding work").
MAX_QUERY_BATCH = 8
# Threads that encode queries. Two batches in flight at once keep both cores busy through the serial parts
# of a forward (Python between ops, small ops that run on one core); the figures against one thread are in
# bench/RESULTS.md.
QUERY_WORKERS = 2


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
    """Runs submitted shards in order on a daemon thread; failed attempts are retried like Celery's."""

    def __init__(self, context: WorkerContext, *, max_attempts: int = MAX_SHARD_ATTEMPTS):
        self.context = context
        self.max_attempts = max_attempts
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
            kind, shard_id, attempt = item
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
            finally:
                self._queue.task_done()
        self._queue.task_done()
