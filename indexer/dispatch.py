"""The in-process worker of the embedded profile: the same shard bodies as Celery, on one background thread."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from indexer.work import (
    MAX_SHARD_ATTEMPTS,
    TRANSIENT_ERRORS,
    WorkerContext,
    encode_query,
    fail_shard_attempt,
    run_shard,
)

log = logging.getLogger(__name__)


class InProcessDispatcher:
    """Runs submitted shards in order on a daemon thread; failed attempts are retried like Celery's."""

    def __init__(self, context: WorkerContext, *, max_attempts: int = MAX_SHARD_ATTEMPTS):
        self.context = context
        self.max_attempts = max_attempts
        self._queue: queue.Queue[tuple[str, int, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="omniattr-worker", daemon=True)
        self._thread.start()
        # Queries get their own thread so they never wait behind an indexing shard.
        self._queries = ThreadPoolExecutor(max_workers=1, thread_name_prefix="omniattr-query")

    def submit(self, kind: str, shard_ids: Sequence[int]) -> None:
        """Queue shards; call after the transaction that created them has committed."""
        for shard_id in shard_ids:
            self._queue.put((kind, shard_id, 1))

    def encode_query(self, *, image_bytes: bytes, attribute: str, timeout: float) -> list[float]:
        """Encode a query image under one attribute; TimeoutError after `timeout` seconds."""
        future = self._queries.submit(encode_query, self.context, image_bytes=image_bytes, attribute=attribute)
        return future.result(timeout=timeout)

    def join(self) -> None:
        """Wait until every queued shard (and the work they queue) has run."""
        self._queue.join()

    def close(self) -> None:
        """Stop the worker thread after the work already queued."""
        self._queue.put(None)
        self._thread.join()
        self._queries.shutdown(wait=True)

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
