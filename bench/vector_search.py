"""Benchmark the vector index: upsert throughput, filtered top-10 latency and recall@10, on both backends.

Data: random unit vectors, a point per (image, attribute), image i in collection i % collections. Every
query filters by one attribute and one image collection (as the search page does); a second row filters by
the attribute alone. Recall is measured against exact numpy search over the same filtered points.
Latency is wall time of `VectorIndex.search` in this process, Python wrapper included.

qdrant-client local mode (the stand-in for a Qdrant server) is brute force in Python, so it gets its own,
smaller point count (`--server-points`); its numbers say nothing about a real Qdrant server.

    python bench/vector_search.py --points 100000 --queries 200 --server-points 10000 --server-queries 30
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from qdrant_client import QdrantClient

from store.vectors import QdrantEdgeIndex, QdrantServerIndex, VectorIndex, VectorPoint

VERSION = "bench@1"


def make_points(rng: np.random.Generator, *, images: int, attributes: int, collections: int, dimension: int):
    """Points and their (N, D) unit vectors, point n = image n // attributes, attribute n % attributes."""
    vectors = rng.standard_normal((images * attributes, dimension)).astype(np.float32)  # (N, D)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    image_ids = np.repeat(np.arange(images), attributes)  # (N,)
    attribute_ids = np.tile(np.arange(attributes), images)  # (N,)
    collection_ids = image_ids % collections  # (N,)
    points = [
        VectorPoint(
            image_id=int(image_ids[row]),
            attribute_id=int(attribute_ids[row]),
            collection_id=int(collection_ids[row]),
            vector=vectors[row],
        )
        for row in range(len(vectors))
    ]
    return points, vectors, image_ids, attribute_ids, collection_ids


def run_backend(name: str, index: VectorIndex, *, images: int, queries: int, args: argparse.Namespace) -> list[dict]:
    """Fill one index and measure it; one result row per filter kind."""
    rng = np.random.default_rng(args.seed)
    points, vectors, image_ids, attribute_ids, collection_ids = make_points(
        rng, images=images, attributes=args.attributes, collections=args.collections, dimension=args.dimension
    )
    index.ensure_collection(encoder_version=VERSION, dimension=args.dimension)

    started = time.perf_counter()
    index.upsert(encoder_version=VERSION, points=points, batch_size=args.batch_size)
    upsert_seconds = time.perf_counter() - started
    started = time.perf_counter()
    index.optimize(encoder_version=VERSION)
    optimize_seconds = time.perf_counter() - started
    print(f"{name}: upserted {len(points)} in {upsert_seconds:.1f} s, optimize {optimize_seconds:.1f} s", flush=True)

    queries = rng.standard_normal((queries, args.dimension)).astype(np.float32)  # (Q, D)
    rows = []
    for filter_kind in ("collection + attribute", "attribute only"):
        per_collection = filter_kind == "collection + attribute"
        latencies, recalls, exact_latencies = [], [], []
        for row, query in enumerate(queries):
            attribute_id = int(rng.integers(args.attributes))
            collection_id = int(rng.integers(args.collections)) if per_collection else None
            mask = attribute_ids == attribute_id  # (N,)
            if collection_id is not None:
                mask &= collection_ids == collection_id
            scores = vectors[mask] @ (query / np.linalg.norm(query))  # (M,)
            truth = set(image_ids[mask][np.argsort(-scores)[:10]].tolist())

            arguments = dict(
                encoder_version=VERSION, vector=query, collection_id=collection_id, attribute_id=attribute_id
            )
            if row < 5:  # warm-up: first touches of mmapped files
                index.search(**arguments)
            started = time.perf_counter()
            hits = index.search(**arguments)
            latencies.append(time.perf_counter() - started)
            recalls.append(len({hit.image_id for hit in hits} & truth) / 10)
            # Local mode is always brute force: exact=True would time the same thing again.
            if row < args.exact_queries and isinstance(index, QdrantEdgeIndex):
                started = time.perf_counter()
                index.search(**arguments, exact=True)
                exact_latencies.append(time.perf_counter() - started)
        rows.append(
            {
                "backend": name,
                "points": len(points),
                "filter": filter_kind,
                "matching": len(points) // args.attributes // (args.collections if per_collection else 1),
                "upsert": len(points) / upsert_seconds,
                "optimize": optimize_seconds if isinstance(index, QdrantEdgeIndex) else None,
                "p50": np.percentile(latencies, 50) * 1e3,
                "p95": np.percentile(latencies, 95) * 1e3,
                "exact_p50": np.percentile(exact_latencies, 50) * 1e3 if exact_latencies else None,
                "recall": float(np.mean(recalls)),
            }
        )
    index.close()
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| backend | points | filter (≈ matching points) | upsert pts/s | HNSW build s | p50 ms | p95 ms "
        "| exact=True p50 ms | recall@10 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        build = "–" if row["optimize"] is None else f"{row['optimize']:.1f}"
        exact = "–" if row["exact_p50"] is None else f"{row['exact_p50']:.2f}"
        lines.append(
            f"| {row['backend']} | {row['points']:,} | {row['filter']} (≈{row['matching']:,}) | {row['upsert']:,.0f} "
            f"| {build} | {row['p50']:.2f} | {row['p95']:.2f} | {exact} | {row['recall']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100_000, help="points in the embedded (Qdrant Edge) index")
    parser.add_argument(
        "--server-points", type=int, default=10_000, help="points in qdrant-client local mode (brute force in Python)"
    )
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--server-queries", type=int, default=30, help="queries per filter kind in local mode")
    parser.add_argument("--exact-queries", type=int, default=50, help="queries also timed with exact=True")
    parser.add_argument("--dimension", type=int, default=256)
    parser.add_argument("--attributes", type=int, default=10)
    parser.add_argument("--collections", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--backends", default="embedded,server", help="comma-separated: embedded, server")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="omniattr-bench-") as scratch:
        for backend in args.backends.split(","):
            if backend == "embedded":
                # No automatic optimisation during the upsert, so upsert and HNSW build are timed apart.
                index = QdrantEdgeIndex(Path(scratch) / "edge", auto_optimize_points=sys.maxsize)
                rows += run_backend(
                    "qdrant-edge (embedded)",
                    index,
                    images=args.points // args.attributes,
                    queries=args.queries,
                    args=args,
                )
            elif backend == "server":
                index = QdrantServerIndex(QdrantClient(location=":memory:"))
                rows += run_backend(
                    "qdrant-client :memory: (server stand-in)",
                    index,
                    images=args.server_points // args.attributes,
                    queries=args.server_queries,
                    args=args,
                )
            else:
                parser.error(f"unknown backend {backend!r}; use embedded or server")

    print()
    print(
        f"Run {datetime.date.today().isoformat()} on {platform.machine()}, Python {platform.python_version()}, "
        f"{len(os.sched_getaffinity(0))} cores; command: python {' '.join(sys.argv)}"
    )
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
