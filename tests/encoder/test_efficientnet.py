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
@pytest.mark.slow
def test_top5_contains_the_right_class(classifier, photo, expected, top1):
    pixels = to_pixels([center_crop(getattr(data, photo)())], IMAGE_SIZE, PIXEL_MEAN, PIXEL_STD)
    with torch.no_grad():
        probabilities = classifier(pixels).softmax(-1)[0]
    top5 = set(probabilities.topk(5).indices.tolist())
    assert top5 & expected, f"{photo}: top-5 {sorted(top5)} misses {sorted(expected)}"
    if top1 is not None:
        assert int(probabilities.argmax()) in top1
        assert probabilities[sorted(top1)].sum() > 0.5  # confident, not a lucky 5th place


@pytest.mark.slow
def test_feature_map_shape(classifier):
    with torch.no_grad():
        assert classifier.features(torch.zeros(2, 3, 224, 224)).shape == (2, 1280, 7, 7)


@pytest.mark.slow
def test_folding_batch_norm_keeps_features_and_logits():
    photo = to_pixels([center_crop(data.chelsea())], IMAGE_SIZE, PIXEL_MEAN, PIXEL_STD)
    plain = load_efficientnet_lite0()
    folded = load_efficientnet_lite0().fold_batch_norm()
    with torch.no_grad():
        torch.testing.assert_close(folded.features(photo), plain.features(photo), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(folded(photo), plain(photo), atol=1e-3, rtol=1e-4)
    assert not [k for k in folded.state_dict() if "_bn" in k]  # every batch norm went into a convolution
    before = {k: v.clone() for k, v in folded.state_dict().items()}
    folded.fold_batch_norm()  # a second fold finds nothing left to fold
    assert all(torch.equal(before[k], v) for k, v in folded.state_dict().items())


@pytest.mark.parametrize(("kernel", "stride", "size"), [(3, 1, 7), (5, 1, 8), (3, 2, 8), (5, 2, 7)])
def test_same_padding_matches_tensorflow(kernel, stride, size):
    from encoder.efficientnet_lite import SameConv2d

    torch.manual_seed(0)
    conv = SameConv2d(4, 4, kernel, stride=stride, groups=4, bias=False)
    x = torch.randn(2, 4, size, size)
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)  # TensorFlow's 'same': extra at the end
    padded = torch.nn.functional.pad(x, [total // 2, total - total // 2] * 2)
    expected = torch.nn.functional.conv2d(padded, conv.weight, None, stride, 0, 1, 4)
    with torch.no_grad():
        got = conv(x)
    assert got.shape[-1] == -(-size // stride)
    torch.testing.assert_close(got, expected)


@pytest.mark.slow
def test_feature_levels_are_the_trunk_maps_at_their_strides(classifier):
    from encoder.config import TRUNK_LEVELS
    from encoder.efficientnet_lite import LEVELS

    assert tuple(LEVELS) == TRUNK_LEVELS  # the torch-free config validates names against this list
    pixels = to_pixels([center_crop(data.chelsea())], IMAGE_SIZE, PIXEL_MEAN, PIXEL_STD)
    with torch.no_grad():
        maps = classifier.feature_levels(pixels, ["stage4", "head", "pixels", "stage2", "stage6"])
        torch.testing.assert_close(maps[1], classifier.features(pixels))
        x = torch.nn.functional.relu6(classifier._bn0(classifier._conv_stem(pixels)))
        by_block = []
        for block in classifier._blocks:
            x = block(x)
            by_block.append(x)
    assert torch.equal(maps[2], pixels)
    for level, got in zip(["stage4", "stage2", "stage6"], [maps[0], maps[3], maps[4]], strict=True):
        channels, index = LEVELS[level]
        assert got.shape[1] == channels
        torch.testing.assert_close(got, by_block[index])
    assert [m.shape[-1] for m in maps] == [14, 7, 224, 28, 7]
    with torch.no_grad():
        (early,) = classifier.feature_levels(pixels, ["stage2"])  # stops after block 4; same values
    torch.testing.assert_close(early, maps[3])
    with pytest.raises(ValueError, match="unknown trunk levels \\['stage9'\\]"):
        classifier.feature_levels(pixels, ["stage9"])
