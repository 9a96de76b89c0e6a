"""Indexer fixtures: a tiny real encoder checkpoint, image folders, and a worker context on real engines."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.context import WorkerContext
from indexer.ingest import MediaStore
from indexer.models import EncoderProvider, describe_encoder
from store.database import make_session_factory
from store.tables import Base
from store.vectors import QdrantEdgeIndex


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A saved tiny random Qwen2-VL encoder (real code path, seconds to load, no download)."""
    from encoder.testing import tiny_mllm_encoder

    root = tmp_path_factory.mktemp("encoder")
    tiny_mllm_encoder(root / "base").save_pretrained(root / "checkpoint")
    return root / "checkpoint"


def write_images(directory: Path, count: int, *, start: int = 0, size: int = 48) -> list[Path]:
    """`count` distinct random PNG photos in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        rng = np.random.default_rng(index)
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        path = directory / f"img{index:04d}.png"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


@pytest.fixture
def worker_context(migrated_engine, tmp_path, tiny_encoder_dir):
    """A WorkerContext on a migrated database, an embedded vector index and a media dir under tmp_path."""
    vectors = QdrantEdgeIndex(tmp_path / "vectors")
    context = WorkerContext(
        session_factory=make_session_factory(migrated_engine),
        vectors=vectors,
        media=MediaStore(tmp_path / "media"),
        encoder=EncoderProvider(tiny_encoder_dir, device="cpu"),
        encoder_info=describe_encoder(tiny_encoder_dir),
        allowed_roots=[tmp_path / "photos"],
        index_batch_size=8,
    )
    yield context
    vectors.close()
    with migrated_engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())
