"""Query encoding: an uploaded image under one attribute -> its pooled vector, for search (not a job).

Both dispatchers serve `Dispatcher.encode_query` with these: the in-process one batches waiting queries on
its own threads, the Celery one runs them on the `query` queue.
"""

from __future__ import annotations

from collections.abc import Sequence

from indexer.context import WorkerContext
from indexer.ingest import ImageRejected, decode_image
from store import metadata
from store.errors import InvalidInputError


def encode_query(context: WorkerContext, *, image_bytes: bytes, attribute: str) -> list[float]:
    """Encode an uploaded query image under one attribute; returns the pooled vector."""
    result = encode_queries(context, [(image_bytes, attribute)])[0]
    if isinstance(result, Exception):
        raise result
    return result


def encode_queries(context: WorkerContext, queries: Sequence[tuple[bytes, str]]) -> list[list[float] | Exception]:
    """Encode several (image bytes, attribute) queries in one forward; a bad query fails alone."""
    import torch

    results: list[list[float] | Exception] = [InvalidInputError("not encoded")] * len(queries)
    images, texts, positions = [], [], []
    for position, (image_bytes, attribute) in enumerate(queries):
        try:
            decoded = decode_image(image_bytes)
            texts.append(metadata.normalize_attribute(attribute))
        except ImageRejected as rejected:
            results[position] = InvalidInputError(f"the query image cannot be used: {rejected}")
            continue
        except InvalidInputError as error:
            results[position] = error
            continue
        images.append(decoded.image)
        positions.append(position)
    if images:
        with torch.inference_mode():
            pooled = context.encoder.get().encode(images, texts).pooled.float().cpu().numpy()  # (B, d)
        for row, position in enumerate(positions):
            results[position] = pooled[row].tolist()
    return results
