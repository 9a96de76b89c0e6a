"""The EfficientNet-Lite0 port: the packaged ImageNet weights classify real photos correctly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from encoder.efficientnet_lite import IMAGE_SIZE, PIXEL_MEAN, PIXEL_STD, load_efficientnet_lite0
from encoder.images import to_pixels

# ImageNet-1k class ids.
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, COFFEE_MUG, CUP = 967, 504, 968
MISSILE, PROJECTILE, SPACE_SHUTTLE = 657, 744, 812


def center_crop(array: np.ndarray) -> Image.Image:
    """The usual ImageNet evaluation view: shorter side to 256, centre 224 crop."""
    image = Image.fromarray(array)
    scale = 256 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left, top = (image.width - IMAGE_SIZE) // 2, (image.height - IMAGE_SIZE) // 2
    return image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))


@pytest.fixture(scope="module")
def classifier():
    return load_efficientnet_lite0()


@pytest.mark.parametrize(
    ("photo", "expected", "top1"),
    [
        ("chelsea", CATS, CATS),
        ("coffee", {ESPRESSO, CUP}, {ESPRESSO}),
        ("rocket", {MISSILE, PROJECTILE}, None),
    ],
)
def test_top5_contains_the_right_class(classifier, photo, expected, top1):
    pixels = to_pixels([center_crop(getattr(data, photo)())], IMAGE_SIZE, PIXEL_MEAN, PIXEL_STD)
    with torch.no_grad():
        probabilities = classifier(pixels).softmax(-1)[0]
    top5 = set(probabilities.topk(5).indices.tolist())
    assert top5 & expected, f"{photo}: top-5 {sorted(top5)} misses {sorted(expected)}"
    if top1 is not None:
        assert int(probabilities.argmax()) in top1
        assert probabilities[sorted(top1)].sum() > 0.5  # confident, not a lucky 5th place


def test_feature_map_shape(classifier):
    with torch.no_grad():
        assert classifier.features(torch.zeros(2, 3, 224, 224)).shape == (2, 1280, 7, 7)
