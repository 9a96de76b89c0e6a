"""Offline image material for the procedural pair generator: subjects, material textures, backgrounds.

Everything comes from code (numpy/PIL drawing) or from the photos bundled with scikit-image, so nothing is
downloaded. Each named asset is fixed: the same name always gives the same pixels at a given size, which is
what makes "the two images share this factor" true. Arrays are float32 in [0, 1] (textures: multipliers
around 1). Assets are built lazily and cached per size by `assets_for_size`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import skimage.data
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

# ---------------------------------------------------------------------------------------------------------
# Source photos


@functools.cache
def _photo(name: str) -> np.ndarray:
    """A bundled scikit-image photo as float32 (H, W, 3) in [0, 1]."""
    array = getattr(skimage.data, name)()
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return array[:, :, :3].astype(np.float32) / 255.0


@functools.cache
def _lfw_faces() -> np.ndarray:
    """The face half of skimage's LFW subset: (100, 25, 25) float in [0, 1]."""
    return skimage.data.lfw_subset()[:100].astype(np.float32)


@functools.cache
def _coin_boxes() -> tuple[tuple[int, int, int, int], ...]:
    """Bounding boxes (top, bottom, left, right) of the single coins in skimage's coins photo, reading order."""
    gray = skimage.data.coins()
    mask = ndimage.binary_fill_holes(ndimage.binary_opening(gray > 107, iterations=2))
    labels, count = ndimage.label(mask)
    boxes = []
    for label, slices in enumerate(ndimage.find_objects(labels), start=1):
        area = int((labels[slices] == label).sum())
        if 1000 <= area <= 3100:  # below: specks; above: two touching coins
            boxes.append((slices[0].start, slices[0].stop, slices[1].start, slices[1].stop))
    boxes.sort(key=lambda box: (box[0] // 60, box[2]))
    return tuple(boxes)


def _resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """A float image (H, W[, C]) in [0, 1] resized with a good filter."""
    image = Image.fromarray(np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(image.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0


def _square_crop(array: np.ndarray, top: int, left: int, side: int, out: int) -> np.ndarray:
    return _resize(array[top : top + side, left : left + side], out, out)


def _value_noise(size: int, cells_y: int, cells_x: int, seed: int) -> np.ndarray:
    """Smooth noise (size, size) in [0, 1]: a small random grid upsampled bicubically."""
    grid = np.random.default_rng(seed).random((cells_y, cells_x)).astype(np.float32)
    image = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    noise = np.asarray(image, dtype=np.float32)
    return (noise - noise.min()) / max(float(noise.max() - noise.min()), 1e-6)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each (size, size), in [-1, 1]."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(axis, axis, indexing="ij")


# ---------------------------------------------------------------------------------------------------------
# Subjects


@dataclass(frozen=True)
class Subject:
    """One subject instance at the canonical size: its pixels, its coverage and whether it is a photo."""

    rgb: np.ndarray  # (S, S, 3): photo pixels, or a white shaded relief with the instance's marking for shapes
    alpha: np.ndarray  # (S, S): coverage in [0, 1]
    is_photo: bool


@dataclass(frozen=True)
class SubjectSpec:
    """How to build one subject instance: its category, caption noun phrase and builder."""

    category: str
    instance: str
    noun: str
    build: Callable[[int], Subject]

    @property
    def identity(self) -> str:
        """The identity factor value, "<category>/<instance>"."""
        return f"{self.category}/{self.instance}"


def _draw_mask(size: int, draw: Callable[[ImageDraw.ImageDraw, int], None]) -> np.ndarray:
    """A (size, size) coverage mask drawn at 4x and box-filtered down, for clean anti-aliased edges."""
    big = Image.new("L", (size * 4, size * 4), 0)
    draw(ImageDraw.Draw(big), size * 4)
    return np.asarray(big.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _polygon_mask(points: np.ndarray) -> Callable[[int], np.ndarray]:
    """A mask builder for a polygon given in unit coordinates [-1, 1] (x, y)."""

    def build(size: int) -> np.ndarray:
        def draw(canvas: ImageDraw.ImageDraw, side: int) -> None:
            pixels = (points * 0.92 + 1.0) * 0.5 * side
            canvas.polygon([tuple(point) for point in pixels], fill=255)

        return _draw_mask(size, draw)

    return build


def _star_points(tips: int, inner: float) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * tips) * np.pi / tips
    radii = np.where(np.arange(2 * tips) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _regular_points(sides: int) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(sides) * 2 * np.pi / sides
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _blob_points(seed: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + seed)
    angles = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    radius = np.ones_like(angles)
    for harmonic in range(2, 6):
        radius += rng.uniform(0.04, 0.16) * np.cos(harmonic * angles + rng.uniform(0, 2 * np.pi))
    radius /= radius.max()
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _heart_points(width: float) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    points = np.stack([x * width, y], axis=1)
    points -= (points.max(axis=0) + points.min(axis=0)) / 2
    return points / np.abs(points).max()


def _arrow_points(shaft: float) -> np.ndarray:
    return np.array(
        [[-1, -shaft], [0.2, -shaft], [0.2, -0.75], [1, 0], [0.2, 0.75], [0.2, shaft], [-1, shaft]], dtype=np.float64
    )


def _ring_mask(inner: float) -> Callable[[int], np.ndarray]:
    def build(size: int) -> np.ndarray:
        def draw(canvas: ImageDraw.ImageDraw, side: int) -> None:
            margin, hole = side * 0.04, side * (1 - inner) / 2
            canvas.ellipse([margin, margin, side - margin, side - margin], fill=255)
            canvas.ellipse([hole, hole, side - hole, side - hole], fill=0)

        return _draw_mask(size, draw)

    return build


def _crescent_mask(shift: float) -> Callable[[int], np.ndarray]:
    def build(size: int) -> np.ndarray:
        def draw(canvas: ImageDraw.ImageDraw, side: int) -> None:
            margin, offset = side * 0.04, side * shift
            canvas.ellipse([margin, margin, side - margin, side - margin], fill=255)
            canvas.ellipse([margin + offset, margin - offset * 0.3, side - margin + offset, side], fill=0)

        return _draw_mask(size, draw)

    return build


def _horse_mask(size: int) -> np.ndarray:
    silhouette = ~skimage.data.horse()  # True on the horse
    return _fit_square(silhouette.astype(np.float32), size)


def _fit_square(array: np.ndarray, size: int) -> np.ndarray:
    """An array (H, W[, C]) scaled to fit (size, size) with its aspect ratio kept, centred on zeros."""
    height, width = array.shape[:2]
    scale = size * 0.94 / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = _resize(array, new_w, new_h)
    out = np.zeros((size, size, *array.shape[2:]), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def _shape_subject(mask_builder: Callable[[int], np.ndarray], marking_seed: int) -> Callable[[int], Subject]:
    """A procedural object: a domed relief (brighter in the middle) with a dark band at an instance angle.

    The band sits off-centre at an angle that is no multiple of 45 degrees, so every rotation and mirroring of
    the object is visible even for a symmetric outline.
    """

    def build(size: int) -> Subject:
        alpha = mask_builder(size)
        height = np.asarray(
            Image.fromarray((alpha * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(size / 14)), np.float32
        )
        height = height / max(float(height.max()), 1.0)
        relief = 0.62 + 0.38 * np.sqrt(height)
        rng = np.random.default_rng(2000 + marking_seed)
        angle = np.deg2rad(rng.choice([20, 65, 110, 155]) + rng.uniform(-8, 8))
        y, x = _grid(size)
        distance = x * np.cos(angle) + y * np.sin(angle) - rng.uniform(0.18, 0.32)
        band = np.clip(1.0 - np.abs(distance) / 0.07, 0.0, 1.0)
        relief = relief * (1.0 - 0.55 * band)
        rgb = np.repeat(relief[:, :, None], 3, axis=2)
        return Subject(rgb=rgb.astype(np.float32), alpha=alpha, is_photo=False)

    return build


def _ellipse_alpha(size: int, height_fraction: float = 1.0, width_fraction: float = 1.0) -> np.ndarray:
    y, x = _grid(size)
    radius = np.sqrt((x / (0.96 * width_fraction)) ** 2 + (y / (0.96 * height_fraction)) ** 2)
    return np.clip((1.0 - radius) / 0.06, 0.0, 1.0).astype(np.float32)


def _photo_subject(photo: str, top: int, bottom: int, left: int, right: int) -> Callable[[int], Subject]:
    """A crop of a bundled photo under a soft elliptical mask that follows the crop's aspect."""

    def build(size: int) -> Subject:
        crop = _photo(photo)[top:bottom, left:right]
        rgb = _fit_square(crop, size)
        height, width = bottom - top, right - left
        alpha = _ellipse_alpha(size, min(1.0, height / width), min(1.0, width / height))
        return Subject(rgb=rgb, alpha=alpha, is_photo=True)

    return build


def _coin_subject(number: int) -> Callable[[int], Subject]:
    def build(size: int) -> Subject:
        top, bottom, left, right = _coin_boxes()[number]
        gray = _photo("coins")[top:bottom, left:right]
        rgb = _fit_square(gray, size)
        alpha = _ellipse_alpha(size)
        return Subject(rgb=rgb, alpha=alpha, is_photo=True)

    return build


def _face_subject(number: int) -> Callable[[int], Subject]:
    def build(size: int) -> Subject:
        face = _lfw_faces()[number]
        rgb = _resize(np.repeat(face[:, :, None], 3, axis=2), size, size)
        return Subject(rgb=rgb, alpha=_ellipse_alpha(size, 1.0, 0.82), is_photo=True)

    return build


def _subject_specs() -> dict[str, SubjectSpec]:
    specs: list[SubjectSpec] = []
    tip_words = {5: "five", 6: "six", 7: "seven", 8: "eight"}
    seed = 0
    for tips in (5, 6, 8):
        for inner, adjective in ((0.42, "sharp"), (0.62, "chubby")):
            points = _star_points(tips, inner)
            specs.append(
                SubjectSpec(
                    "star",
                    f"{tips}-{adjective}",
                    f"{adjective} {tip_words[tips]}-pointed star",
                    _shape_subject(_polygon_mask(points), seed),
                )
            )
            seed += 1
    for sides, noun in ((3, "triangle"), (4, "square"), (5, "pentagon"), (6, "hexagon"), (8, "octagon")):
        specs.append(SubjectSpec("polygon", noun, noun, _shape_subject(_polygon_mask(_regular_points(sides)), seed)))
        seed += 1
    for number in range(8):
        specs.append(
            SubjectSpec(
                "blob", f"{number}", "rounded pebble shape", _shape_subject(_polygon_mask(_blob_points(number)), seed)
            )
        )
        seed += 1
    for width, adjective in ((1.0, "round"), (0.75, "narrow")):
        specs.append(
            SubjectSpec(
                "heart", adjective, f"{adjective} heart", _shape_subject(_polygon_mask(_heart_points(width)), seed)
            )
        )
        seed += 1
    for inner, adjective in ((0.72, "thin"), (0.45, "thick")):
        specs.append(SubjectSpec("ring", adjective, f"{adjective} ring", _shape_subject(_ring_mask(inner), seed)))
        seed += 1
    for shift, adjective in ((0.25, "fat"), (0.4, "slim")):
        specs.append(
            SubjectSpec(
                "crescent", adjective, f"{adjective} crescent moon", _shape_subject(_crescent_mask(shift), seed)
            )
        )
        seed += 1
    for shaft, adjective in ((0.18, "slender"), (0.38, "bold")):
        specs.append(
            SubjectSpec(
                "arrow", adjective, f"{adjective} arrow", _shape_subject(_polygon_mask(_arrow_points(shaft)), seed)
            )
        )
        seed += 1
    specs.append(SubjectSpec("horse", "silhouette", "horse", _shape_subject(_horse_mask, seed)))
    specs.append(SubjectSpec("cat", "chelsea", "tabby cat", _photo_subject("chelsea", 0, 300, 70, 400)))
    specs.append(SubjectSpec("cup", "espresso", "espresso cup on a saucer", _photo_subject("coffee", 20, 400, 60, 520)))
    specs.append(SubjectSpec("person", "astronaut", "astronaut", _photo_subject("astronaut", 0, 330, 60, 340)))
    specs.append(SubjectSpec("person", "cameraman", "man with a camera", _photo_subject("camera", 20, 420, 60, 400)))
    specs.append(SubjectSpec("helmet", "space", "space helmet", _photo_subject("astronaut", 300, 512, 300, 512)))
    specs.append(
        SubjectSpec("rocket", "launch", "rocket on its launch pad", _photo_subject("rocket", 90, 420, 250, 390))
    )
    specs.append(SubjectSpec("logo", "snake", "round snake emblem", _photo_subject("logo", 0, 500, 0, 500)))
    for number in range(12):
        specs.append(SubjectSpec("coin", f"{number:02d}", "coin", _coin_subject(number)))
    for number in range(12):
        specs.append(SubjectSpec("face", f"{number:02d}", "face", _face_subject(number)))
    return {spec.identity: spec for spec in specs}


SUBJECTS: dict[str, SubjectSpec] = _subject_specs()


# ---------------------------------------------------------------------------------------------------------
# Material textures: (S, S) multipliers around 1, laid over the subject in its own frame (they turn with it)


def _checker(size: int) -> np.ndarray:
    y, x = np.indices((size, size))
    period = max(2, size // 7)
    return np.where(((y // period) + (x // period)) % 2 == 0, 1.15, 0.55).astype(np.float32)


def _stripes(size: int) -> np.ndarray:
    y, x = _grid(size)
    return (0.85 + 0.35 * np.sign(np.sin((x + y) * 9.0))).astype(np.float32)


def _dots(size: int) -> np.ndarray:
    y, x = _grid(size)
    cell_y, cell_x = (y * 4.5) % 1.0 - 0.5, (x * 4.5) % 1.0 - 0.5
    return np.where(cell_y**2 + cell_x**2 < 0.09, 0.5, 1.1).astype(np.float32)


def _wood(size: int) -> np.ndarray:
    y, x = _grid(size)
    warp = _value_noise(size, 5, 5, seed=11) * 1.2
    rings = np.sin(np.sqrt((x + 1.6) ** 2 + (y * 0.25) ** 2) * 14.0 + warp * 6.0)
    grain = _value_noise(size, size // 2, 6, seed=12)
    return (0.78 + 0.22 * rings + 0.12 * (grain - 0.5)).astype(np.float32)


def _marble(size: int) -> np.ndarray:
    y, x = _grid(size)
    turbulence = _value_noise(size, 6, 6, seed=21) + 0.5 * _value_noise(size, 14, 14, seed=22)
    veins = np.abs(np.sin((x * 3.0 + y * 2.0 + turbulence * 4.0) * 2.2))
    return (1.15 - 0.6 * (1.0 - veins) ** 6).astype(np.float32)


def _brushed_metal(size: int) -> np.ndarray:
    y, _ = _grid(size)
    streaks = _value_noise(size, size, 3, seed=31)  # noise varies along y only: long horizontal streaks
    sheen = np.exp(-((y - 0.25) ** 2) / 0.05)
    return (0.62 + 0.28 * streaks + 0.5 * sheen).astype(np.float32)


def _photo_texture(photo: str, side: int, contrast: float) -> Callable[[int], np.ndarray]:
    def build(size: int) -> np.ndarray:
        gray = _square_crop(_photo(photo), 0, 0, side, size)[:, :, 0]
        return (1.0 + contrast * (gray - gray.mean()) / max(float(gray.std()), 1e-6)).astype(np.float32)

    return build


def _weave(size: int) -> np.ndarray:
    y, x = _grid(size)
    warp_threads = np.abs(np.sin(x * 22.0))
    weft_threads = np.abs(np.sin(y * 22.0))
    over = np.sign(np.sin(x * 11.0) * np.sin(y * 11.0)) > 0
    return (0.6 + 0.5 * np.where(over, warp_threads, weft_threads)).astype(np.float32)


def _speckle(size: int) -> np.ndarray:
    noise = np.random.default_rng(41).random((size, size)).astype(np.float32)
    return np.where(noise > 0.82, 0.45, 1.05 + 0.1 * noise).astype(np.float32)


def _scales(size: int) -> np.ndarray:
    y, x = _grid(size)
    rows = y * 5.0
    shifted = x * 5.0 + 0.5 * (np.floor(rows) % 2)
    cell_y, cell_x = rows % 1.0, shifted % 1.0 - 0.5
    distance = np.sqrt(cell_x**2 + cell_y**2)
    return (0.55 + 0.6 * np.clip(1.0 - distance, 0.0, 1.0)).astype(np.float32)


MATERIALS: dict[str, tuple[str, Callable[[int], np.ndarray]]] = {
    # value: (caption adjective, texture builder)
    "matte": ("matte", lambda size: np.ones((size, size), np.float32)),
    "checkered": ("checkered", _checker),
    "striped": ("striped", _stripes),
    "polka-dot": ("polka-dot", _dots),
    "wood": ("wooden", _wood),
    "marble": ("marble", _marble),
    "brushed-metal": ("brushed-metal", _brushed_metal),
    "stone": ("stony", _photo_texture("gravel", 160, 0.3)),
    "brick": ("brick-patterned", _photo_texture("brick", 200, 0.3)),
    "fur": ("furry", _photo_texture("grass", 140, 0.32)),
    "woven": ("woven fabric", _weave),
    "speckled": ("speckled", _speckle),
    "scales": ("scaly", _scales),
}


# ---------------------------------------------------------------------------------------------------------
# Backgrounds: (B, B, 3) with B = size + 2 * margin, so a jittered crop of (size, size) fits


def _plain(color: tuple[float, float, float]) -> Callable[[int], np.ndarray]:
    return lambda side: np.broadcast_to(np.array(color, np.float32), (side, side, 3)).copy()


def _gradient(start: tuple[float, ...], end: tuple[float, ...], angle: float) -> Callable[[int], np.ndarray]:
    def build(side: int) -> np.ndarray:
        y, x = _grid(side)
        t = np.clip((x * np.cos(np.deg2rad(angle)) + y * np.sin(np.deg2rad(angle))) * 0.5 + 0.5, 0, 1)[:, :, None]
        return (np.array(start, np.float32) * (1 - t) + np.array(end, np.float32) * t).astype(np.float32)

    return build


def _pattern(kind: str, first: tuple[float, ...], second: tuple[float, ...]) -> Callable[[int], np.ndarray]:
    def build(side: int) -> np.ndarray:
        y, x = _grid(side)
        if kind == "checker":
            chosen = (np.floor(x * 4) + np.floor(y * 4)) % 2 == 0
        elif kind == "stripes":
            chosen = np.sin((x - y) * 12.0) > 0
        elif kind == "dots":
            chosen = ((x * 5) % 1 - 0.5) ** 2 + ((y * 5) % 1 - 0.5) ** 2 < 0.06
        else:  # grid paper
            chosen = (np.abs((x * 8) % 1 - 0.5) > 0.46) | (np.abs((y * 8) % 1 - 0.5) > 0.46)
        return np.where(chosen[:, :, None], np.array(first, np.float32), np.array(second, np.float32))

    return build


def _scene(photo: str, top: int, left: int, side: int, tint=(1.0, 1.0, 1.0)) -> Callable[[int], np.ndarray]:
    def build(out: int) -> np.ndarray:
        crop = _square_crop(_photo(photo), top, left, side, out)
        return np.clip(crop * np.array(tint, np.float32), 0, 1)

    return build


BACKGROUNDS: dict[str, tuple[str, Callable[[int], np.ndarray]]] = {
    # value: (caption phrase, builder)
    "white": ("on a plain white background", _plain((0.95, 0.95, 0.94))),
    "light-gray": ("on a plain light gray background", _plain((0.74, 0.75, 0.76))),
    "charcoal": ("on a plain charcoal background", _plain((0.16, 0.16, 0.18))),
    "navy": ("on a plain navy blue background", _plain((0.1, 0.16, 0.38))),
    "beige": ("on a plain beige background", _plain((0.86, 0.78, 0.62))),
    "sage": ("on a plain sage green background", _plain((0.56, 0.66, 0.52))),
    "sunset-gradient": ("on an orange-to-purple sunset gradient", _gradient((1.0, 0.6, 0.2), (0.35, 0.15, 0.5), 90)),
    "sky-gradient": ("on a blue sky gradient", _gradient((0.35, 0.6, 0.95), (0.9, 0.95, 1.0), 90)),
    "teal-gradient": ("on a diagonal teal-to-pink gradient", _gradient((0.1, 0.6, 0.6), (0.95, 0.6, 0.75), 45)),
    "forest-gradient": ("on a dark green gradient", _gradient((0.05, 0.2, 0.08), (0.45, 0.65, 0.3), 0)),
    "checkerboard": ("on a gray checkerboard", _pattern("checker", (0.85, 0.85, 0.85), (0.45, 0.45, 0.45))),
    "diagonal-stripes": ("on yellow and white diagonal stripes", _pattern("stripes", (0.98, 0.85, 0.3), (1, 1, 1))),
    "polka-dots": ("on a red polka-dot background", _pattern("dots", (0.95, 0.95, 0.9), (0.8, 0.2, 0.2))),
    "grid-paper": ("on blue grid paper", _pattern("grid", (0.45, 0.6, 0.9), (0.97, 0.97, 1.0))),
    "space-shuttle": ("in front of a space shuttle", _scene("astronaut", 0, 300, 212)),
    "launch-pad": ("at a rocket launch pad at night", _scene("rocket", 100, 0, 300)),
    "night-sky": ("against a deep blue night sky", _scene("rocket", 0, 440, 200)),
    "city-skyline": ("in front of a distant city skyline", _scene("camera", 150, 340, 172, (1.0, 0.97, 0.9))),
    "wooden-table": ("on a wooden table", _scene("coffee", 0, 470, 130)),
    "brick-wall": ("in front of a brick wall", _scene("brick", 0, 0, 300, (1.25, 0.78, 0.6))),
    "lawn": ("on a grassy lawn", _scene("grass", 0, 0, 260, (0.7, 1.1, 0.55))),
    "gravel": ("on a gravel path", _scene("gravel", 100, 100, 260, (1.1, 1.0, 0.85))),
    "deep-space": ("against a starry deep-space sky", _scene("hubble_deep_field", 100, 200, 500)),
    "moon-surface": ("on a gray lunar surface", _scene("moon", 100, 100, 300)),
    "printed-page": ("on a page of printed text", _scene("page", 0, 190, 191)),
    "handwritten-notes": ("on a sheet of handwritten equations", _scene("text", 0, 200, 172)),
    "tissue-slide": ("on a stained microscope slide", _scene("immunohistochemistry", 0, 0, 256)),
    "cat-fur": ("on a close-up of tabby fur", _scene("chelsea", 150, 0, 150)),
    "coin-pile": ("on a tray of old coins", _scene("coins", 0, 0, 150)),
}


# ---------------------------------------------------------------------------------------------------------
# The cache


class Assets:
    """The subjects, textures and backgrounds for one output size, built on first use and then reused."""

    def __init__(self, size: int) -> None:
        if size < 32:
            raise ValueError(f"size must be at least 32 pixels, got {size}")
        self.size = size
        self.margin = max(2, size // 16)
        # Subjects are never drawn bigger than ~0.82 of the frame (largest layout with jitter), so they are
        # built at that side: no detail is lost and colouring, texturing and rotating them costs less.
        self.subject_size = round(size * 0.82)
        self._subjects: dict[str, Subject] = {}
        self._textures: dict[str, np.ndarray] = {}
        self._backgrounds: dict[str, np.ndarray] = {}

    def subject(self, identity: str) -> Subject:
        """The subject for an identity value "<category>/<instance>"."""
        if identity not in self._subjects:
            self._subjects[identity] = SUBJECTS[identity].build(self.subject_size)
        return self._subjects[identity]

    def texture(self, material: str) -> np.ndarray:
        """The (S, S) multiplier of a material value, S = subject_size."""
        if material not in self._textures:
            self._textures[material] = MATERIALS[material][1](self.subject_size)
        return self._textures[material]

    def background(self, name: str) -> np.ndarray:
        """The (S + 2 margin, S + 2 margin, 3) backdrop of a background value."""
        if name not in self._backgrounds:
            self._backgrounds[name] = BACKGROUNDS[name][1](self.size + 2 * self.margin)
        return self._backgrounds[name]


@functools.cache
def assets_for_size(size: int) -> Assets:
    """The shared asset cache for one output size."""
    return Assets(size)
