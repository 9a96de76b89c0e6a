"""Turn what callers hand the encoder (PIL images, numpy arrays, paths) into RGB pixels of one square size.

Every backend sees the same conversions: odd modes become 8-bit RGB, transparency is composited on
white, and the whole image is resized (not cropped, so that background and framing attributes survive)
to the backend's square input. EXIF orientation is not applied here; ingest does it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

ImageInput = Union[Image.Image, np.ndarray, str, Path]  # noqa: UP007 (a runtime alias, read by users)

# Above this many pixels an image is refused before it is decoded: a decompression bomb, or a scan that
# would need gigabytes to decode. 10000 x 10000 (100 MP) is still accepted and downsampled.
MAX_IMAGE_PIXELS = 16384 * 16384
# A huge image is first reduced in integer steps to at most this side, then resized with a proper filter.
_REDUCE_TO_SIDE = 2048


def load_rgb(image: ImageInput, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """One image (PIL, numpy array or path) as an 8-bit RGB PIL image; ValueError says what is wrong."""
    if isinstance(image, str | Path):
        image = _open_path(Path(image), max_pixels)
    elif isinstance(image, np.ndarray):
        image = _from_array(image)
    elif not isinstance(image, Image.Image):
        raise ValueError(
            f"cannot read an image from {type(image).__name__}; pass a PIL image, a numpy array (H, W[, C]) "
            "or a file path"
        )
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(
            f"image is {width}x{height} = {width * height} pixels, more than the {max_pixels} allowed; "
            "downscale it before encoding"
        )
    if width < 1 or height < 1:
        raise ValueError(f"image is {width}x{height}: it has no pixels")
    if max(width, height) > _REDUCE_TO_SIDE:
        image.draft("RGB", (_REDUCE_TO_SIDE, _REDUCE_TO_SIDE))  # JPEG decodes at 1/2..1/8 scale; no-op otherwise
    image = _to_rgb(image)
    factor = max(image.size) // _REDUCE_TO_SIDE
    if factor > 1:
        # Box-average in integer steps first: resizing 100 MP straight to 224 px is slow.
        image = image.reduce(factor)
    return image


def _open_path(path: Path, max_pixels: int) -> Image.Image:
    if not path.is_file():
        raise ValueError(f"image file {path} does not exist")
    with warnings.catch_warnings():
        # PIL warns above ~89 MP and raises above ~179 MP; we apply our own limit (max_pixels) instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as err:
            raise ValueError(f"image file {path} is too large to decode safely: {err}") from err
        except OSError as err:
            raise ValueError(f"cannot decode image file {path}: {err}") from err
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(
            f"image file {path} is {width}x{height} = {width * height} pixels, more than the {max_pixels} "
            "allowed; downscale it before encoding"
        )
    return image


def _from_array(array: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 1|3|4) arrays of uint8, uint16 or float in [0, 1] -> PIL image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(
            f"image array has shape {array.shape}; expected (H, W) grayscale or (H, W, 3|4) RGB(A) with channels last"
        )
    if array.dtype == np.uint16:
        array = (array // 257).astype(np.uint8)  # 65535 -> 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("image array contains NaN or infinite values")
        scale = 255.0 if array.max() <= 1.0 else 1.0  # floats in [0, 1], or already on the 0..255 scale
        array = np.clip(array * scale, 0, 255).round().astype(np.uint8)
    elif array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        raise ValueError(f"image array has dtype {array.dtype}; use uint8, uint16 or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(array))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Alpha (RGBA, LA, PA, P with transparency) is composited on white."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit and 32-bit grayscale: rescale to 8 bits by the range the values actually use.
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"image (mode {mode}) contains NaN or infinite values")
        top = values.max()
        scale = 1.0 if top <= 255 else (257.0 if top <= 65535 else top / 255.0)
        if mode == "F" and top <= 1.0:
            scale = 1.0 / 255.0
        image = Image.fromarray(np.clip(values / scale, 0, 255).round().astype(np.uint8))
        mode = image.mode
    if mode == "P" or mode == "PA" or mode == "LA":
        image = image.convert("RGBA")
    elif mode not in ("RGB", "RGBA"):
        image = image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX ...
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image).convert("RGB")
    return image


def to_pixels(
    images: Sequence[ImageInput],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    device: torch.device | str | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> torch.Tensor:
    """Images -> (N, 3, size, size) float32 on `device`, normalised by mean/std (given on the 0..1 scale)."""
    if isinstance(images, str | Path | Image.Image | np.ndarray):
        raise ValueError("pass a list of images, even for one image")
    if len(images) == 0:
        raise ValueError("no images given; pass at least one")
    arrays = []
    for index, image in enumerate(images):
        try:
            rgb = load_rgb(image, max_pixels=max_pixels)
        except ValueError as err:
            raise ValueError(f"image {index}: {err}") from err
        # Bicubic on the whole image; a 1x1 image becomes a flat colour, which is what it is.
        arrays.append(np.asarray(rgb.resize((size, size), Image.BICUBIC), dtype=np.uint8))
    # uint8 crosses to the device (4x fewer bytes than float), then is scaled there.
    pixels = torch.from_numpy(np.stack(arrays)).to(device).permute(0, 3, 1, 2)  # (N, 3, S, S) uint8
    pixels = pixels.float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t
