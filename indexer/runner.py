"""Read -> encode -> write for one shard of images under several attributes, each stage timed.

`encode_grid_pooled` is the pure middle (a typed batch in, vectors out); reading and writing are the only I/O.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from indexer.ingest import MediaStore
from omniattr.domain import ImageStatus
from store import metadata
from store.vectors import VectorIndex, VectorPoint


@dataclass
class StageTimes:
    """Seconds spent in each stage of a run."""

    read: float = 0.0
    encode: float = 0.0
    write: float = 0.0

    def add(self, other: StageTimes) -> None:
        self.read += other.read
        self.encode += other.encode
        self.write += other.write


@dataclass(frozen=True)
class LoadedImage:
    """An image row joined with its decoded pixels."""

    image_id: int
    collection_id: int
    pixels: Image.Image
    payload: dict[str, Any]  # written beside each vector, for metadata filters in search


@dataclass
class ShardResult:
    """What one shard achieved: (image, attribute) encodings written and failed, with reasons."""

    done: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    times: StageTimes = field(default_factory=StageTimes)


def read_images(
    session_factory: sessionmaker[Session], media: MediaStore, image_ids: Sequence[int]
) -> tuple[list[LoadedImage], list[tuple[int, str]]]:
    """Load the ready images among `image_ids`; deleted rows are skipped, unreadable files reported."""
    with session_factory() as session:
        rows = metadata.get_images(session, image_ids=image_ids)
        wanted = [rows[i] for i in image_ids if i in rows and rows[i].status == ImageStatus.READY]
        described = [
            # sha256 ties the point to the content it encodes (checked by `work._images_missing_vectors`).
            (
                row.id,
                row.collection_id,
                row.sha256,
                row.format,
                {**row.metadata_, "format": row.format, "sha256": row.sha256},
            )
            for row in wanted
        ]
    loaded, failures = [], []
    for image_id, collection_id, sha256, file_format, payload in described:
        path = media.original_path(sha256, file_format)
        try:
            with Image.open(path) as opened:
                pixels = opened.convert("RGB")
        except OSError as error:
            failures.append((image_id, f"image {image_id}: cannot read {path.name}: {error}"))
            continue
        loaded.append(LoadedImage(image_id, collection_id, pixels, payload))
    return loaded, failures


def encode_grid_pooled(encoder: Any, images: Sequence[Image.Image], attributes: Sequence[str]) -> np.ndarray:
    """Pooled, L2-normalised embeddings of every image under every attribute: (N, K, d) float32."""
    import torch

    with torch.inference_mode():
        pooled = encoder.encode_grid(list(images), list(attributes)).pooled  # (N, K, d)
    return pooled.float().cpu().numpy()


def write_vectors(
    vectors: VectorIndex,
    *,
    encoder_version: str,
    images: Sequence[LoadedImage],
    attribute_ids: Sequence[int],
    pooled: np.ndarray,
) -> int:
    """Upsert one point per (image, attribute) with deterministic ids; returns the number written."""
    points = [
        VectorPoint(
            image_id=image.image_id,
            attribute_id=attribute_id,
            collection_id=image.collection_id,
            vector=pooled[row, column],
            payload=image.payload,
        )
        for row, image in enumerate(images)
        for column, attribute_id in enumerate(attribute_ids)
    ]
    return vectors.upsert(encoder_version=encoder_version, points=points)


def index_images(
    *,
    session_factory: sessionmaker[Session],
    media: MediaStore,
    vectors: VectorIndex,
    encoder: Any,
    encoder_version: str,
    image_ids: Sequence[int],
    attributes: Sequence[tuple[int, str]],
    batch_size: int = 32,
) -> ShardResult:
    """Encode `image_ids` under every (attribute id, text) in batches and write the vectors."""
    result = ShardResult()
    attribute_ids = [attribute_id for attribute_id, _ in attributes]
    texts = [text for _, text in attributes]
    for start in range(0, len(image_ids), batch_size):
        batch_ids = image_ids[start : start + batch_size]
        began = time.perf_counter()
        loaded, failures = read_images(session_factory, media, batch_ids)
        read_done = time.perf_counter()
        result.failed += len(failures) * len(attributes)
        result.errors.extend(reason for _, reason in failures)
        if loaded:
            pooled = encode_grid_pooled(encoder, [image.pixels for image in loaded], texts)
            encode_done = time.perf_counter()
            result.done += write_vectors(
                vectors, encoder_version=encoder_version, images=loaded, attribute_ids=attribute_ids, pooled=pooled
            )
            result.times.add(StageTimes(read_done - began, encode_done - read_done, time.perf_counter() - encode_done))
        else:
            result.times.read += read_done - began
    return result
