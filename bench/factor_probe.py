"""Which factors can the frozen trunk's features tell apart at all? Linear probes per factor and feature level.

The compact encoder reads only the trunk's head map (1280 x 7 x 7 at 224 px) through its projector, and the
starter model is near chance on lighting, pose, layout and material. This bench asks whether that is the
training (too short, wrong loss) or the input (the head map has already discarded the factor: ImageNet
training makes late features invariant to brightness and colour casts). For each feature level it fits a
ridge classifier per factor on one procedural gallery and reports accuracy on a second gallery rendered from
another seed. A factor the head map cannot separate linearly, while an earlier stage or plain pixel
statistics can, points at the encoder's input rather than its training.

Feature levels (all average-pooled to a 3 x 3 grid, so position survives, then standardised):
  pixels 7x7   mean RGB of each of 7 x 7 cells (147 values): what a colour histogram sees
  stage 2      after block 4: 40 x 28 x 28 (low-level edges and colours)
  stage 4      after block 10: 112 x 14 x 14
  stage 6      after block 15: 320 x 7 x 7 (before the head convolution)
  head         1280 x 7 x 7: the only input of the connector today
  head + pixels

    .venv/bin/python bench/factor_probe.py                      # 1600 train / 600 test images, ~2 minutes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from encoder.efficientnet_lite import PIXEL_MEAN, PIXEL_STD, load_efficientnet_lite0  # noqa: E402
from encoder.images import to_pixels  # noqa: E402
from training.data.procedural import factor_parts  # noqa: E402
from training.evaluate import make_gallery  # noqa: E402

STAGES = {"stage 2": "stage2", "stage 4": "stage4", "stage 6": "stage6", "head": "head"}  # column -> trunk level
GRID = 3
SIZE = 224


@torch.no_grad()
def feature_levels(images: list, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Images -> {level: (N, D) float32} for every level in the module docstring."""
    trunk = load_efficientnet_lite0().eval()
    levels: dict[str, list[np.ndarray]] = {name: [] for name in ("pixels 7x7", *STAGES)}
    for start in range(0, len(images), batch_size):
        pixels = to_pixels(images[start : start + batch_size], SIZE, PIXEL_MEAN, PIXEL_STD)
        levels["pixels 7x7"].append(F.adaptive_avg_pool2d(pixels, 7).flatten(1).numpy())
        for column, level in zip(STAGES, trunk.feature_levels(pixels, list(STAGES.values())), strict=True):
            levels[column].append(F.adaptive_avg_pool2d(level, GRID).flatten(1).numpy())
    out = {name: np.concatenate(parts).astype(np.float32) for name, parts in levels.items()}
    out["head + pixels"] = np.concatenate([out["head"], out["pixels 7x7"]], axis=1)
    return out


def targets(factors: list[dict[str, str]]) -> dict[str, list[str]]:
    """Factor name -> value per image, then "factor: part" rows for the parts of composite factors."""
    names = sorted({name for values in factors for name in values})
    out = {name: [values.get(name, "") for values in factors] for name in names}
    for name in names:
        parts = [factor_parts(name, value) if value else {} for value in out[name]]
        for part in next((p for p in parts if p), {}):
            out[f"{name}: {part}"] = [p.get(part, "") for p in parts]
    return out


def probe(train_x: np.ndarray, train_y: list[str], test_x: np.ndarray, test_y: list[str]) -> float:
    """Test accuracy of a ridge classifier (regularisation chosen by leave-one-out on the train set)."""
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.preprocessing import StandardScaler

    keep_train = [i for i, y in enumerate(train_y) if y]
    keep_test = [i for i, y in enumerate(test_y) if y]
    scaler = StandardScaler().fit(train_x[keep_train])
    model = RidgeClassifierCV(alphas=np.logspace(-1, 4, 11))
    model.fit(scaler.transform(train_x[keep_train]), [train_y[i] for i in keep_train])
    predicted = model.predict(scaler.transform(test_x[keep_test]))
    return float(np.mean(predicted == np.array([test_y[i] for i in keep_test])))


def majority(train_y: list[str], test_y: list[str]) -> float:
    """Accuracy of always answering the train set's most common value: the floor a probe must beat."""
    values, counts = np.unique([y for y in train_y if y], return_counts=True)
    top = values[np.argmax(counts)]
    kept = [y for y in test_y if y]
    return float(np.mean(np.array(kept) == top))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1600, help="training gallery size (seed --seed)")
    parser.add_argument("--test", type=int, default=600, help="test gallery size (seed --seed + 1)")
    parser.add_argument("--seed", type=int, default=11, help="not a seed the starter recipe uses (1, 2, 3)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    train = make_gallery(args.train, args.seed, image_size=SIZE)
    test = make_gallery(args.test, args.seed + 1, image_size=SIZE)
    rendered = time.perf_counter()
    train_features, test_features = feature_levels(train.images), feature_levels(test.images)
    featured = time.perf_counter()
    train_targets, test_targets = targets(train.factors), targets(test.factors)

    levels = list(train_features)
    print(
        f"{args.train} train / {args.test} test images, render {rendered - started:.0f} s, "
        f"features {featured - rendered:.0f} s; test accuracy of a ridge probe per feature level"
    )
    print()
    print("| factor | values | majority | " + " | ".join(levels) + " |")
    print("|---|---:|---:|" + "---:|" * len(levels))
    for name in train_targets:
        count = len({y for y in train_targets[name] if y})
        cells = [
            f"{probe(train_features[level], train_targets[name], test_features[level], test_targets[name]):.3f}"
            for level in levels
        ]
        floor = majority(train_targets[name], test_targets[name])
        print(f"| {name} | {count} | {floor:.3f} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
