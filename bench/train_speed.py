"""Pairs per second of one encoder training step on this machine: the trunk every step vs the feature cache.

Same model, batch and losses on both paths (a training config's encoder and losses); data loading is left
out of both (batches are decoded before timing); a few warm-up steps are dropped and the median of N steps
is reported, with where a cached step spends its time.

    .venv/bin/python bench/train_speed.py --config configs/starter-real.yaml --batch 16 --steps 5 --threads 2
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.config import load_train_config  # noqa: E402
from training.data.pairs import PairDataset, load_pairs, records_with_both  # noqa: E402
from training.feature_cache import FeatureCache  # noqa: E402
from training.trainer import AttributeTrainingModule, _CachedPairDataset, build_encoder  # noqa: E402


def _timed(function):
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def measure(module: AttributeTrainingModule, batches: list, warmup: int) -> tuple[float, dict[str, float]]:
    """Median seconds per step over `batches` after `warmup` steps, and the median split of one step."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    module.train()
    totals, parts = [], {"features": [], "forward": [], "backward+step": []}
    for index, batch in enumerate(batches):
        start = time.perf_counter()
        images = [s.image_x for s in batch] + [s.image_y for s in batch]
        _, features_s = _timed(lambda images=images: module.image_features(images))  # timed apart, then again
        forward_start = time.perf_counter()
        losses = module(batch, random.Random(index))
        forward_s = time.perf_counter() - forward_start
        _, backward_s = _timed(
            lambda losses=losses: (losses["loss"].backward(), optimizer.step(), optimizer.zero_grad())
        )
        total = time.perf_counter() - start - features_s  # the step itself computes the features once
        if index >= warmup:
            totals.append(total)
            parts["features"].append(features_s)
            parts["forward"].append(forward_s - features_s)
            parts["backward+step"].append(backward_s)
    return statistics.median(totals), {k: statistics.median(v) for k, v in parts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/starter-real.yaml", help="training config (model, losses)")
    parser.add_argument("--data", help="pair dataset (default: 64 procedural pairs rendered into a temp dir)")
    parser.add_argument("--batch", type=int, default=16, help="pairs per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="train-speed-"))
    data = Path(args.data) if args.data else work / "data"
    if not args.data:
        from training.data.procedural import main as procedural

        procedural(["--out", str(data), "--pairs", str(max(64, args.batch * 2)), "--size", "224", "--seed", "1"])
    values = load_train_config(args.config).to_dict()
    values.update(data_dir=str(data), output_dir=str(work / "out"), feature_cache=None, init_encoder=None)
    values.update(grow_floor=False, grow_image_levels=[])
    config = load_train_config(values)
    records = records_with_both(load_pairs(data, verify_images=False).records)
    count = args.warmup + args.steps
    picks = [[(i * args.batch + j) % len(records) for j in range(args.batch)] for i in range(count)]
    plain, cached = PairDataset(data, records, seed=0), _CachedPairDataset(data, records, seed=0)
    torch.manual_seed(0)
    encoder = build_encoder(config, None)
    cache = FeatureCache(work / "cache", encoder.backbone)
    _, fill_s = _timed(lambda: cache.fill(sorted({str(data / p) for r in records for p in (r.image_x, r.image_y)})))
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    rows = {}
    for name, dataset, feature_cache in (("trunk every step", plain, None), ("feature cache", cached, cache)):
        encoder.load_state_dict(state)
        module = AttributeTrainingModule(config, encoder, feature_cache=feature_cache)
        batches = [[dataset[i] for i in pick] for pick in picks]
        rows[name] = measure(module, batches, args.warmup)
    print(f"config {args.config}, batch {args.batch} pairs ({2 * args.batch} images), {args.threads} threads, ")
    print(
        f"median of {args.steps} steps after {args.warmup} warm-up; cache fill {fill_s:.1f} s for {len(cache)} images\n"
    )
    print("| path | s / step | pairs / s | features | rest of forward | backward + step |")
    print("|---|---|---|---|---|---|")
    for name, (seconds, parts) in rows.items():
        print(
            f"| {name} | {seconds:.2f} | {args.batch / seconds:.1f} | {parts['features']:.2f} | "
            f"{parts['forward']:.2f} | {parts['backward+step']:.2f} |"
        )
    before, after = rows["trunk every step"][0], rows["feature cache"][0]
    print(f"\nspeed-up: {before / after:.1f}x pairs/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
