"""Attribute retrieval on a source the starter encoder never saw: real photos under filters of our own.

The training corpus is procedural, and it is built partly from scikit-image's bundled photos (chelsea, coffee,
astronaut, camera, rocket and logo as subjects; hubble_deep_field, moon, immunohistochemistry, coins and the
textures as backgrounds), so none of those is used here. This gallery is the 6 bundled photos whose pixels
never enter training: scikit-image's motorcycle (left view), retina, clock and cell, and scikit-learn's china
and flower. Each is rendered in 5 styles (the photo, posterized, pencil sketch, oil paint, emboss: filters
written here, not the training ones; emboss has no counterpart in training) under 3 lightings (as shot, dim
and warm, bright and cool). Every image is a query against the rest; relevant = same style / same lighting /
same photo.

    .venv/bin/python bench/heldout_photos.py --model starter=models/starter/encoder
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.evaluate import HolisticTrunkEmbedder, as_embedder, retrieval_scores  # noqa: E402

SIZE = 224


def photos() -> Iterator[tuple[str, Image.Image]]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    # Never used by training/data/procedural_assets.py (checked against its _photo / _scene / skimage.data calls).
    sources: dict[str, Callable[[], np.ndarray]] = {
        "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],
        "retina": skimage.data.retina,
        "clock": skimage.data.clock,
        "cell": skimage.data.cell,
    }
    for name, load in sources.items():
        yield name, _square(Image.fromarray(load()).convert("RGB"))
    samples = load_sample_images()
    for name, array in zip(("china", "flower"), samples.images, strict=True):
        yield name, _square(Image.fromarray(array).convert("RGB"))


def _square(image: Image.Image) -> Image.Image:
    return ImageOps.fit(image, (SIZE, SIZE), Image.Resampling.BICUBIC)


STYLES: dict[str, Callable[[Image.Image], Image.Image]] = {
    "photo": lambda image: image,
    "posterized": lambda image: ImageOps.posterize(image, 2),
    "pencil sketch": lambda image: ImageOps.invert(
        image.convert("L").filter(ImageFilter.FIND_EDGES).point(lambda v: min(255, v * 3))
    ).convert("RGB"),
    "oil paint": lambda image: image.filter(ImageFilter.ModeFilter(9)).filter(ImageFilter.SMOOTH_MORE),
    "emboss": lambda image: image.filter(ImageFilter.EMBOSS),
}


def _light(image: Image.Image, gain: float, rgb: tuple[float, float, float]) -> Image.Image:
    array = np.asarray(image, dtype=np.float32) * gain * np.asarray(rgb, dtype=np.float32)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


LIGHTINGS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "as shot": lambda image: image,
    "dim warm": lambda image: _light(image, 0.55, (1.15, 0.95, 0.7)),
    "bright cool": lambda image: _light(image, 1.35, (0.8, 0.95, 1.2)),
}

QUERIES = {"style": "art style", "lighting": "lighting", "photo": "the main subject"}


def gallery() -> tuple[list[Image.Image], dict[str, list[str]]]:
    images, labels = [], {"style": [], "lighting": [], "photo": []}
    for name, photo in photos():
        for style, stylise in STYLES.items():
            for lighting, light in LIGHTINGS.items():
                images.append(light(stylise(photo)))
                labels["style"].append(style)
                labels["lighting"].append(lighting)
                labels["photo"].append(name)
    return images, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="encoder directory")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    images, labels = gallery()
    rows = {"holistic (trunk)": HolisticTrunkEmbedder(SIZE)}
    for item in args.model:
        name, _, path = item.partition("=")
        rows[name] = as_embedder(path)
    texts = list(QUERIES.values())
    photos_count = len(set(labels["photo"]))
    print(f"{len(images)} images: {photos_count} photos x {len(STYLES)} styles x {len(LIGHTINGS)} lightings\n")
    print("| model | " + " | ".join(f"{factor} ('{text}') mAP@10 / P@10" for factor, text in QUERIES.items()) + " |")
    print("|---" * (len(QUERIES) + 1) + "|")
    for name, embedder in rows.items():
        pooled = embedder.embed_grid(images, texts).double().numpy()  # (N, 3, d)
        cells = []
        for column, factor in enumerate(QUERIES):
            scores = retrieval_scores(pooled[:, column], labels[factor])
            cells.append(f"{scores.map_at_k:.3f} / {scores.precision_at_k:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    constant = np.ones((len(images), 1))
    chance = [retrieval_scores(constant, labels[factor]) for factor in QUERIES]
    print("| chance | " + " | ".join(f"{s.map_at_k:.3f} / {s.precision_at_k:.3f}" for s in chance) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
