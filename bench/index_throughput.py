"""Ingest and attribute indexing end to end through real Celery, Redis, PostgreSQL and the vector index.

    python bench/index_throughput.py [--images 2000] [--attributes 4] [--record]

Builds a procedural collection, saves a compact encoder (weights do not change throughput), starts a real
Celery worker (solo pool, the machine's torch threads), then times:
  * ingest (decode, hash, thumbnail, rows) of every image, in images/s;
  * indexing under K attributes, in (image, attribute) encodings/s;
  * the bare encoder on the same images and batch size in this process, for the queue + store overhead.
Needs PostgreSQL and Redis on loopback (OMNIATTR_TEST_POSTGRES_URL / OMNIATTR_TEST_REDIS_URL to override).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.models import describe_encoder  # noqa: E402
from indexer.tasks import CeleryDispatcher, create_celery_app  # noqa: E402
from indexer.work import plan_index_attributes, plan_ingest_directory, register_encoder  # noqa: E402
from omniattr.settings import Settings  # noqa: E402
from omniattr.testing import create_throwaway_postgres, drop_throwaway_postgres  # noqa: E402
from store import metadata  # noqa: E402
from store.database import make_engine, make_session_factory, upgrade_database  # noqa: E402

ATTRIBUTES = ["lighting", "art style", "background", "color", "material", "pose", "layout", "subject"]
POSTGRES = os.environ.get("OMNIATTR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("OMNIATTR_TEST_REDIS_URL", "redis://127.0.0.1:6379/12")


def make_collection(directory: Path, count: int, size: int) -> list[Path]:
    """Procedural images with real structure (photo crops, textures, styles)."""
    from training.data.procedural import encode_png, render_image, sample_factors

    directory.mkdir(parents=True)
    paths = []
    for index in range(count):
        rng = np.random.default_rng(index)
        path = directory / f"img{index:05d}.png"
        path.write_bytes(encode_png(render_image(sample_factors(rng), size=size, jitter_seed=index)))
        paths.append(path)
    return paths


def bare_encoder_rate(encoder_dir: Path, paths: list[Path], attributes: list[str], batch: int) -> float:
    """(image, attribute) encodings/s of encode_grid in this process, decode included, as the worker does it."""
    import torch
    from PIL import Image

    from encoder import AttributeEncoder

    encoder = AttributeEncoder.from_pretrained(encoder_dir).eval()
    with torch.inference_mode():
        warm = [Image.open(p).convert("RGB") for p in paths[:batch]]
        encoder.encode_grid(warm, attributes)
        started, done = time.perf_counter(), 0
        for start in range(0, len(paths), batch):
            images = [Image.open(p).convert("RGB") for p in paths[start : start + batch]]
            encoder.encode_grid(images, attributes)
            done += len(images) * len(attributes)
    return done / (time.perf_counter() - started)


def wait(session_factory, job_id: int, timeout: float) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        with session_factory() as session:
            job = metadata.get_job(session, job_id=job_id)
            if job.status in ("done", "failed", "cancelled"):
                if job.status != "done":
                    raise SystemExit(f"job {job_id} ended {job.status}: {job.error}")
                return time.perf_counter() - started
        time.sleep(0.1)
    raise SystemExit(f"job {job_id} did not finish in {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--attributes", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=32, help="encoder batch (OMNIATTR_INDEX_BATCH_SIZE)")
    parser.add_argument("--bare-images", type=int, default=256, help="images for the bare-encoder baseline")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    attributes = ATTRIBUTES[: args.attributes]

    import redis

    from encoder import AttributeEncoder, EncoderConfig

    work = Path(tempfile.mkdtemp(prefix="omniattr-bench-"))
    photos, data = work / "photos", work / "data"
    print(f"building {args.images} images under {photos} ...", file=sys.stderr)
    paths = make_collection(photos, args.images, args.size)
    encoder_dir = work / "encoder-checkpoint"
    AttributeEncoder(EncoderConfig.compact()).save_pretrained(encoder_dir)
    info = describe_encoder(encoder_dir)

    # Bare encoder before and after the pipeline: the mean damps drift in machine load.
    bare_before = bare_encoder_rate(encoder_dir, paths[: args.bare_images], attributes, args.batch)
    database = create_throwaway_postgres(POSTGRES)
    upgrade_database(database)
    redis.Redis.from_url(REDIS).flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIATTR_")}
    env.update(
        OMNIATTR_DATABASE_URL=database,
        OMNIATTR_BROKER_URL=REDIS,
        OMNIATTR_DATA_DIR=str(data),
        OMNIATTR_ENCODER_PATH=str(encoder_dir),
        OMNIATTR_DEVICE="cpu",
        OMNIATTR_INDEX_BATCH_SIZE=str(args.batch),
        OMNIATTR_ALLOWED_ROOTS=f'["{photos}"]',
    )
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "indexer.celery_app",
            "worker",
            "--pool=solo",
            "-Q",
            "ingest,encode,query",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel=WARNING",
        ],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    engine = make_engine(database)
    session_factory = make_session_factory(engine)
    settings = Settings(_env_file=None, broker_url=REDIS, database_url=database)
    dispatcher = CeleryDispatcher(create_celery_app(settings))
    try:
        with session_factory.begin() as session:
            collection = metadata.create_collection(session, name="bench")
            encoder_model = register_encoder(session, info)
            ingest = plan_ingest_directory(
                session, collection_id=collection.id, directory=photos, allowed_roots=[photos]
            )
        dispatcher.submit(ingest.kind, ingest.shard_ids)
        ingest_seconds = wait(session_factory, ingest.job_id, timeout=3600)
        # Load the model in the worker before timing indexing (a worker loads it once, at its first task).
        dispatcher.encode_query(image_bytes=paths[0].read_bytes(), attribute="lighting", timeout=600)
        with session_factory.begin() as session:
            index = plan_index_attributes(
                session, collection_id=collection.id, attribute_texts=attributes, encoder_model_id=encoder_model.id
            )
        dispatcher.submit(index.kind, index.shard_ids)
        index_seconds = wait(session_factory, index.job_id, timeout=7200)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=120)
        engine.dispose()
        drop_throwaway_postgres(POSTGRES, database)

    encodings = args.images * len(attributes)
    pipeline_rate = encodings / index_seconds
    bare_after = bare_encoder_rate(encoder_dir, paths[: args.bare_images], attributes, args.batch)
    bare_rate = (bare_before + bare_after) / 2
    overhead = bare_rate / pipeline_rate - 1  # extra time per encoding relative to the bare encoder
    rows = [
        ("ingest (Celery `ingest` queue)", f"{args.images / ingest_seconds:.1f} images/s", f"{ingest_seconds:.1f} s"),
        (
            f"indexing, K={len(attributes)} (Celery `encode` queue)",
            f"{pipeline_rate:.1f} encodings/s",
            f"{index_seconds:.1f} s",
        ),
        (
            f"bare encoder, encode_grid batch {args.batch}",
            f"{bare_rate:.1f} encodings/s",
            f"in-process; {bare_before:.1f} before, {bare_after:.1f} after",
        ),
        ("queue + store overhead over bare encoder", f"{overhead * 100:+.1f} %", "goal <= 15 %"),
    ]
    header = (
        f"{args.images} images of {args.size}x{args.size}, {len(attributes)} attributes, compact encoder, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"load average {os.getloadavg()[0]:.1f}, {datetime.now(UTC):%Y-%m-%d}"
    )
    table = "\n".join(["| stage | throughput | time |", "|---|---|---|", *[f"| {a} | {b} | {c} |" for a, b, c in rows]])
    print(header)
    print(table)
    if args.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as results:
            results.write(
                f"\n## Indexing throughput (bench/index_throughput.py)\n\n"
                f"`python bench/index_throughput.py --images {args.images} --attributes {args.attributes}`"
                f"\n\n{header}\n\n{table}\n"
            )


if __name__ == "__main__":
    main()
