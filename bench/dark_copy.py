"""The issue-17 complaint as a check: does a darkened copy of a photo find dark images under "lighting"?

Every photo bundled with scikit-image (those that load offline; several are training sources of the procedural
and real-content pairs, so this is a sanity check, not a held-out benchmark) plus a copy at 35 % brightness.
Each dark copy is a query under "lighting": the share of dark images among its 5 nearest neighbours (chance
about 0.49) and how often its own bright original comes first (what a model of content rather than light does).

    mkdir -p /tmp/old && git archive 2639826 models/starter/encoder | tar -x -C /tmp/old   # the previous starter
    .venv/bin/python bench/dark_copy.py --model previous=/tmp/old/models/starter/encoder --model models/starter/encoder
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from encoder import AttributeEncoder  # noqa: E402

PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "retina", "cat", "immunohistochemistry", "colorwheel",
    "coins", "hubble_deep_field", "moon", "page", "text", "clock", "cell", "horse", "logo", "brick", "grass", "gravel",
)  # fmt: skip


def gallery() -> tuple[list[Image.Image], list[tuple[str, bool]]]:
    """Each photo bright and at 35 % brightness: images and (photo name, is dark)."""
    import skimage.data

    images, labels = [], []
    arrays = {name: getattr(skimage.data, name)() for name in PHOTOS}
    arrays["motorcycle"] = skimage.data.stereo_motorcycle()[0]
    for name, array in arrays.items():
        array = array if array.dtype == np.uint8 else (np.clip(array, 0, 1) * 255).astype(np.uint8)
        image = Image.fromarray(array).convert("RGB")
        images += [image, ImageEnhance.Brightness(image).enhance(0.35)]
        labels += [(name, False), (name, True)]
    return images, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="[NAME=]DIR")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    images, labels = gallery()
    for item in args.model:
        name, _, path = item.rpartition("=")
        encoder = AttributeEncoder.from_pretrained(path).eval()
        with torch.no_grad():
            vectors = encoder.encode_grid(images, ["lighting"]).pooled[:, 0].double().numpy()
        cosines = vectors @ vectors.T
        shares, own_first = [], 0
        queries = [i for i, (_, dark) in enumerate(labels) if dark]
        for query in queries:
            ranked = [j for j in np.argsort(-cosines[query]) if j != query][:5]
            shares.append(np.mean([labels[j][1] for j in ranked]))
            own_first += labels[ranked[0]] == (labels[query][0], False)
        print(
            f"{name or path}: {len(images)} images, {len(queries)} dark queries under 'lighting': dark share of the "
            f"top 5 {np.mean(shares):.2f}, own bright original first {own_first}/{len(queries)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
