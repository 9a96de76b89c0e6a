"""Throughput of the procedural pair generator on one core: pairs per CPU-second and per wall second.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/procedural_speed.py [--pairs 300] [--size 128]
CPU time is reported beside wall time because wall time on a shared machine depends on the other load.
Each pair = sampling + rendering two images + PNG-encoding both (no disk writes).
"""

from __future__ import annotations

import argparse
import json
import time

from training.data.procedural import ProceduralConfig, encode_png, pair_rng, render_image, sample_pair


def main() -> None:
    """Warm the asset caches, then time sampling, rendering and encoding separately."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    config = ProceduralConfig(size=args.size)
    for index in range(300):  # builds every subject, texture, background and the mosaic tiling once
        spec = sample_pair(pair_rng(99, index), config)
        render_image(spec.factors_x, size=args.size, jitter_seed=1)
    cpu = {"sample": 0.0, "render": 0.0, "encode": 0.0}
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    for index in range(args.pairs):
        started = time.process_time()
        spec = sample_pair(pair_rng(0, index), config)
        sampled = time.process_time()
        images = [
            render_image(spec.factors_x, size=args.size, jitter_seed=spec.jitter_x),
            render_image(spec.factors_y, size=args.size, jitter_seed=spec.jitter_y),
        ]
        rendered = time.process_time()
        for image in images:
            encode_png(image)
        encoded = time.process_time()
        cpu["sample"] += sampled - started
        cpu["render"] += rendered - sampled
        cpu["encode"] += encoded - rendered
    wall, total_cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    print(
        json.dumps(
            {
                "size": args.size,
                "pairs": args.pairs,
                "cpu_ms_per_pair": {stage: round(seconds / args.pairs * 1000, 2) for stage, seconds in cpu.items()},
                "pairs_per_cpu_second": round(args.pairs / total_cpu, 1),
                "pairs_per_wall_second": round(args.pairs / wall, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
