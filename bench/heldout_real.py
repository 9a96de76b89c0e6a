"""Attribute retrieval on held-out real images: packages no training run reads, under transforms no training run uses.

Only images of training.data.splits.HELDOUT_SOURCES enter (any other row of the manifest is refused; scikit-image's
bundled photos are a training source, since training/data/procedural_assets.py renders from them), minus the
second view of a stereo / near-identical pair (so one scene is never two "different" photos). The transforms are
written here, independently of training/data/transforms.py, with the operations and ranges of the held-out column
of the agreed split (issue 17): gamma curves, off-centre radial spotlights, channel-mixer casts, local contrast,
blue-white vertical haze; palettes of other images (k-means) and their hue rotations; ink wash, mosaic, emboss,
engraving and crayon filters.

Galleries (every image a query against the rest of its gallery; relevant = same group; mAP@10 / P@10 as in
training/evaluate.py, ties in expectation, so chance comes exactly from the group sizes):
- lighting: held-out photos, each under several lighting classes, never twice under one class; relevant = other
  photos under the same class (the same photo under another class is a distractor: identity cannot answer it).
- color palette: photos posterised to the k-means palette of a reference photo (not in the gallery), or to that
  palette hue-rotated by a named amount; group = palette. (A hue rotation of two different photos gives them no
  shared palette, so the rotation is applied to the palette.)
- art style: (i) photos under the style filters, group = filter; (ii) untransformed Stellarium constellation art,
  group = sky culture (cultures with fewer than MIN_CULTURE images dropped, at most CULTURE_CAP per culture).
- subject: (i) untransformed Tux Paint stamps composited on white, group = stamp category folder; (ii) the
  lighting and style images again, group = source photo.
Delta(pos, neg) (training/evaluate.py) on pairs of these images: same lighting class / palette / filter and a
different photo (positive that attribute, negative "subject"), or the same photo under two lighting classes or two
filters (positive "subject", negative "lighting" / "art style"). The holistic trunk has Delta 0 by construction.

    python bench/heldout_real.py --model models/starter/encoder --manifest /work/realdata/manifest.jsonl
"""

from __future__ import annotations

import argparse
import colorsys
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from scipy import ndimage
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from encoder.runtime import reuse_freed_memory  # noqa: E402
from training.data.splits import HELDOUT_SOURCES, split_of  # noqa: E402
from training.evaluate import (  # noqa: E402
    DEFAULT_K,
    HolisticTrunkEmbedder,
    RetrievalScores,
    as_embedder,
    delta_pos_neg,
    retrieval_scores,
)

SIZE = 224
# The phrase a user types, then a paraphrase of it (reported separately; the goals use the typed phrase).
ATTRIBUTES: dict[str, tuple[str, str]] = {
    "lighting": ("lighting", "light and shadow"),
    "color palette": ("color palette", "colours"),
    "art style": ("art style", "painting style"),
    "subject": ("subject", "the main subject"),
}
# Held-out photos left out: the second view of a stereo pair or a copy of another photo in the manifest (same
# scene, other camera / b&w). (scikit-image's photos are a training source: training/data/splits.py.)
NEAR_COPIES = frozenset({"aloeR.jpg", "right.jpg", "leuvenB.jpg", "graf3.png", "aero3.jpg", "teriyaki-bw.png"})
MIN_CULTURE, CULTURE_CAP = 8, 8
MIN_STAMP_GROUP, STAMP_CAP = 6, 10


@dataclass(frozen=True)
class Sizes:
    """How many images each gallery draws (the defaults keep the shipped model + trunk under ~5 min on 2 CPUs)."""

    lighting_per_class: int = 14
    palette_per_class: int = 16
    palette_references: int = 4
    style_per_class: int = 26
    delta_pairs_per_kind: int = 40


# ---------------------------------------------------------------------------------------------------------
# Manifest


def load_heldout_rows(manifest: str | Path) -> list[dict]:
    """The manifest rows of held-out sources; rows of training sources are dropped, unknown sources are an error."""
    rows = [json.loads(line) for line in Path(manifest).read_text().splitlines() if line.strip()]
    return [row for row in rows if split_of(row["source"]) == "heldout"]


def check_heldout(rows: Sequence[Mapping]) -> None:
    """Raise unless every row comes from a held-out source (the last guard before an image enters a gallery)."""
    bad = sorted({row["source"] for row in rows if row["source"] not in HELDOUT_SOURCES})
    if bad:
        raise ValueError(
            f"images from non-held-out sources {bad} would enter the benchmark; see training/data/splits.py"
        )


def heldout_photos(rows: Sequence[Mapping]) -> list[dict]:
    """Held-out photos usable as transform inputs, in a fixed order."""
    photos = [row for row in rows if row["kind"] == "photo" and PurePosixPath(row["path"]).name not in NEAR_COPIES]
    return sorted(photos, key=lambda row: row["id"])


def sky_culture(path: str) -> str:
    """The Stellarium sky culture of a manifest path (the folder after skycultures/)."""
    parts = PurePosixPath(path).parts
    return parts[parts.index("skycultures") + 1]


def stamp_category(path: str) -> str:
    """The Tux Paint stamp category of a manifest path: the two folders after stamps/ (or one, for a top file)."""
    parts = PurePosixPath(path).parts
    folders = parts[parts.index("stamps") + 1 : -1]
    return "/".join(folders[:2])


def capped_groups(rows: Sequence[Mapping], group_of: Callable[[str], str], minimum: int, cap: int, rng) -> list:
    """(row, group) for groups with at least `minimum` rows, at most `cap` random rows per group; sorted by group."""
    groups: dict[str, list] = defaultdict(list)
    for row in sorted(rows, key=lambda row: row["id"]):
        groups[group_of(row["path"])].append(row)
    chosen = []
    for group in sorted(groups):
        members = groups[group]
        if len(members) < minimum:
            continue
        picks = rng.permutation(len(members))[:cap]
        chosen += [(members[i], group) for i in sorted(picks)]
    return chosen


def load_image(root: Path, row: Mapping, background: tuple[int, int, int] | None = None) -> Image.Image:
    """A manifest image as SIZE x SIZE RGB: centre-cropped, or padded onto `background` (alpha composited) if given."""
    with Image.open(root / row["file"]) as image:
        if background is None:
            return ImageOps.fit(image.convert("RGB"), (SIZE, SIZE), Image.Resampling.BICUBIC)
        canvas = Image.new("RGBA", image.size, background + (255,))
        flat = Image.alpha_composite(canvas, image.convert("RGBA")).convert("RGB")
        return ImageOps.pad(flat, (SIZE, SIZE), Image.Resampling.BICUBIC, color=background)


# ---------------------------------------------------------------------------------------------------------
# Held-out transforms: float32 arrays (H, W, 3) in [0, 1] -> the same, with a numpy Generator for parameters


def _luminance(x: np.ndarray) -> np.ndarray:
    return x @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)  # (H, W)


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def gamma(low: float, high: float):
    """Exposure by a gamma curve (>1 darkens, <1 brightens), gamma drawn from [low, high]."""
    return lambda x, rng: _clip(x ** rng.uniform(low, high))


def spotlight(cx: float, cy: float):
    """A radial, vignette-shaped spotlight centred off-centre at (cx, cy) in image fractions; dim elsewhere."""

    def apply(x: np.ndarray, rng) -> np.ndarray:
        h, w = x.shape[:2]
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        radius = rng.uniform(0.35, 0.45) * max(h, w)
        falloff = np.exp(-(((xs - cx * w) ** 2 + (ys - cy * h) ** 2) / (2 * radius**2)))  # (H, W)
        gain = rng.uniform(0.15, 0.25) + rng.uniform(1.1, 1.3) * falloff
        return _clip(x * gain[..., None])

    return apply


def channel_cast(mix: Sequence[Sequence[float]], tint: Sequence[float]):
    """A colour cast by a channel mixer (out = mix @ rgb) and then a per-channel tint curve (x ** tint)."""
    matrix = np.asarray(mix, dtype=np.float32)
    exponents = np.asarray(tint, dtype=np.float32)

    def apply(x: np.ndarray, rng) -> np.ndarray:
        amount = rng.uniform(0.8, 1.0)  # between identity and the full mix
        mixed = x @ (np.eye(3, dtype=np.float32) + amount * (matrix - np.eye(3, dtype=np.float32))).T
        return _clip(_clip(mixed) ** exponents)

    return apply


def hard_local_contrast(x: np.ndarray, rng) -> np.ndarray:
    """Hard light, CLAHE-like: detail around a blurred local mean amplified 2.2-2.8x, then a histogram stretch."""
    local = ndimage.gaussian_filter(x, sigma=(10, 10, 0))
    out = local + rng.uniform(2.2, 2.8) * (x - local)
    low, high = np.percentile(out, [1, 99])  # stretch the 1st..99th percentile onto [0, 1]
    return _clip((out - low) / max(high - low, 1e-3))


def soft_local_contrast(x: np.ndarray, rng) -> np.ndarray:
    """Soft light: the large-scale shading (blurred local mean) compressed to 30-45 % around its mean, detail kept."""
    local = ndimage.gaussian_filter(x, sigma=(10, 10, 0))
    mean = local.mean(axis=(0, 1))
    return _clip(mean + rng.uniform(0.3, 0.45) * (local - mean) + (x - local))


def blue_haze(x: np.ndarray, rng) -> np.ndarray:
    """Blend toward a light blue-white, denser at the top (farther away) than at the bottom: 25-45 %."""
    h = x.shape[0]
    top, bottom = rng.uniform(0.38, 0.45), rng.uniform(0.25, 0.3)
    alpha = np.linspace(top, bottom, h, dtype=np.float32)[:, None, None]  # (H, 1, 1)
    haze = np.asarray([0.82, 0.89, 1.0], dtype=np.float32)
    return _clip((1 - alpha) * x + alpha * haze)


LIGHTINGS: dict[str, Callable] = {
    "gamma-dark": gamma(1.8, 2.4),
    "gamma-bright": gamma(0.45, 0.6),
    "spotlight-left": spotlight(0.12, 0.5),
    "spotlight-right": spotlight(0.88, 0.5),
    "spotlight-top": spotlight(0.5, 0.1),
    "warm cast": channel_cast([[0.9, 0.25, 0.0], [0.08, 0.92, 0.0], [0.0, 0.05, 0.7]], [0.85, 0.95, 1.15]),
    "cool cast": channel_cast([[0.72, 0.05, 0.0], [0.0, 0.92, 0.08], [0.0, 0.25, 0.9]], [1.15, 0.97, 0.85]),
    "local-contrast hard": hard_local_contrast,
    "local-contrast soft": soft_local_contrast,
    "blue-white haze": blue_haze,
}


def kmeans_palette(x: np.ndarray, k: int, rng, iterations: int = 12) -> np.ndarray:
    """(k, 3) cluster centres of a subsample of the image's pixels (plain Lloyd iterations, seeded)."""
    pixels = x.reshape(-1, 3)
    sample = pixels[rng.choice(len(pixels), size=min(4000, len(pixels)), replace=False)]
    centres = sample[rng.choice(len(sample), size=k, replace=False)]
    for _ in range(iterations):
        nearest = ((sample[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)  # (n,)
        centres = np.stack([sample[nearest == c].mean(0) if (nearest == c).any() else centres[c] for c in range(k)])
    return centres.astype(np.float32)


def rotate_hue(palette: np.ndarray, degrees: float) -> np.ndarray:
    """The palette with every colour's hue turned by `degrees` (HSV), saturation and value kept."""
    turned = []
    for r, g, b in palette:
        hue, saturation, value = colorsys.rgb_to_hsv(float(r), float(g), float(b))
        turned.append(colorsys.hsv_to_rgb((hue + degrees / 360.0) % 1.0, saturation, value))
    return np.asarray(turned, dtype=np.float32)


def posterise_to(palette: np.ndarray):
    """Move the image's per-channel mean/std onto the palette's, then snap every pixel to the nearest palette colour."""

    def apply(x: np.ndarray, rng) -> np.ndarray:
        pixels = x.reshape(-1, 3)
        target_mean, target_std = palette.mean(0), palette.std(0) + 0.05
        matched = (pixels - pixels.mean(0)) / (pixels.std(0) + 1e-3) * target_std + target_mean  # (n, 3)
        nearest = ((matched[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1)
        return palette[nearest].reshape(x.shape)

    return apply


def _edges(gray: np.ndarray, sigma: float) -> np.ndarray:
    smooth = ndimage.gaussian_filter(gray, sigma)
    magnitude = np.hypot(ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1))
    return np.clip(magnitude / (np.percentile(magnitude, 98) + 1e-6), 0, 1)  # (H, W)


def ink_wash(x: np.ndarray, rng) -> np.ndarray:
    """Grey ink: dark brush edges over a few washes of diluted ink on white paper."""
    gray = _luminance(x)
    wash = np.round(ndimage.gaussian_filter(gray, 3.0) * 4) / 4  # 5 levels of ink
    wash = 0.35 + 0.65 * wash  # diluted: never full black
    edges = _edges(gray, 1.2) ** 1.5
    out = wash * (1 - 0.85 * edges)
    return _clip(np.repeat(out[..., None], 3, axis=2))


def mosaic(x: np.ndarray, rng) -> np.ndarray:
    """Voronoi tiles of the tile's mean colour with dark grout between tiles."""
    h, w = x.shape[:2]
    seeds = rng.uniform(0, 1, size=(int(rng.integers(220, 320)), 2)) * (h, w)
    ys, xs = np.mgrid[0:h, 0:w]
    grid = np.stack([ys.ravel(), xs.ravel()], 1)
    distances, nearest = cKDTree(seeds).query(grid, k=2)  # (HW, 2)
    labels = nearest[:, 0]
    counts = np.bincount(labels, minlength=len(seeds))[:, None]
    means = np.stack([np.bincount(labels, x.reshape(-1, 3)[:, c], len(seeds)) for c in range(3)], 1)
    out = means[labels] / np.maximum(counts[labels], 1)
    grout = (distances[:, 1] - distances[:, 0]) < 1.5  # near a tile border
    out[grout] = 0.18
    return _clip(out.reshape(x.shape))


def emboss(x: np.ndarray, rng) -> np.ndarray:
    """Grey relief: the diagonal derivative of the luminance around mid-grey, as if lit from the top left."""
    gray = ndimage.gaussian_filter(_luminance(x), 1.0)
    relief = np.roll(gray, (1, 1), axis=(0, 1)) - np.roll(gray, (-1, -1), axis=(0, 1))
    out = 0.5 + 2.5 * relief
    return _clip(np.repeat(out[..., None], 3, axis=2))


def engraving(x: np.ndarray, rng) -> np.ndarray:
    """Black parallel lines on cream paper, thicker where the photo is darker, bent by the image's contours."""
    h, w = x.shape[:2]
    gray = ndimage.gaussian_filter(_luminance(x), 1.0)
    period = rng.uniform(4.5, 6.0)
    ys = np.mgrid[0:h, 0:w][0].astype(np.float32)
    phase = (ys + 6.0 * gray) / period  # lines follow the tone a little
    stripe = 0.5 + 0.5 * np.cos(2 * np.pi * phase)  # (H, W) in [0, 1]
    ink = stripe < (1 - gray) * 0.9  # darker -> wider line
    paper, black = np.asarray([0.96, 0.93, 0.84], np.float32), np.asarray([0.08, 0.07, 0.06], np.float32)
    return np.where(ink[..., None], black, paper).astype(np.float32)


def crayon(x: np.ndarray, rng) -> np.ndarray:
    """Saturated flat crayon colours in diagonal waxy strokes that let the white paper show through."""
    hsv = np.asarray(Image.fromarray((x * 255).astype(np.uint8)).convert("HSV"), np.float32) / 255
    hsv[..., 1] = np.clip(hsv[..., 1] * 1.5 + 0.15, 0, 1)
    colours = np.asarray(Image.fromarray((hsv * 255).astype(np.uint8), "HSV").convert("RGB"), np.float32) / 255
    colours = np.round(ndimage.median_filter(colours, size=(5, 5, 1)) * 5) / 5
    noise = rng.random(x.shape[:2]).astype(np.float32)
    strokes = ndimage.uniform_filter(noise, size=1)
    for shift in range(1, 9):  # smear along the diagonal: strokes
        strokes = strokes + np.roll(noise, (shift, shift), axis=(0, 1))
    strokes = (strokes - strokes.mean()) / strokes.std()
    pressure = 1.0 - _luminance(colours)  # dark colours are pressed harder: less paper shows
    covered = strokes > (0.2 - 2.0 * pressure)
    return np.where(covered[..., None], colours, np.float32(0.98)).astype(np.float32)


STYLES: dict[str, Callable] = {
    "ink wash": ink_wash,
    "mosaic": mosaic,
    "emboss": emboss,
    "engraving": engraving,
    "crayon": crayon,
}


def to_array(image: Image.Image) -> np.ndarray:
    """RGB image -> float32 (H, W, 3) in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def to_image(array: np.ndarray) -> Image.Image:
    """float (H, W, 3) in [0, 1] -> RGB image."""
    return Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------
# The benchmark's images


@dataclass
class Pool:
    """Every image the benchmark embeds once, with its origin (manifest id) and what was done to it."""

    images: list[Image.Image] = field(default_factory=list)
    origin: list[str] = field(default_factory=list)
    transform: list[str] = field(default_factory=list)

    def add(self, image: Image.Image, origin: str, transform: str) -> int:
        """Append an image; its index in the pool."""
        self.images.append(image)
        self.origin.append(origin)
        self.transform.append(transform)
        return len(self.images) - 1


@dataclass
class Gallery:
    """A retrieval gallery: pool indices, each image's group, the attribute it is searched under."""

    name: str
    attribute: str
    indices: list[int]
    groups: list[str]

    def summary(self) -> str:
        """'N images, G groups of min-max'."""
        sizes = Counter(self.groups).values()
        return f"{len(self.indices)} images, {len(sizes)} groups of {min(sizes)}-{max(sizes)}"


@dataclass
class Benchmark:
    """The pool, its galleries and the Delta pairs (pool index x, pool index y, positive, negative attribute)."""

    pool: Pool
    galleries: list[Gallery]
    pairs: list[tuple[int, int, str, str]]


def _assign(photo_count: int, classes: Sequence[str], per_class: int, rng) -> list[tuple[str, int]]:
    """(class, photo) with `per_class` distinct photos per class, photos used as evenly as possible."""
    order = rng.permutation(photo_count)
    per_class = min(per_class, photo_count)
    return [
        (name, int(order[(c * per_class + j) % photo_count]))
        for c, name in enumerate(classes)
        for j in range(per_class)
    ]


def _transformed(pool: Pool, photo: np.ndarray, origin: str, name: str, function: Callable, seed: Sequence[int]) -> int:
    return pool.add(to_image(function(photo, np.random.default_rng(list(seed)))), origin, name)


def build_benchmark(manifest: str | Path, seed: int = 0, sizes: Sizes = Sizes()) -> Benchmark:
    """Load the held-out images of `manifest`, transform them and lay out the galleries and Delta pairs."""
    root = Path(manifest).parent
    rows = load_heldout_rows(manifest)
    rng = np.random.default_rng([seed, 17])
    photos = heldout_photos(rows)
    if len(photos) < sizes.palette_references + 4:
        raise ValueError(f"{len(photos)} held-out photos in {manifest}: too few; build it with training.data.realdata")
    check_heldout(photos)
    arrays = [to_array(load_image(root, row)) for row in photos]
    ids = [row["id"] for row in photos]
    pool, galleries = Pool(), []

    lighting_items = []  # (pool index, class, photo)
    for number, (name, photo) in enumerate(_assign(len(photos), list(LIGHTINGS), sizes.lighting_per_class, rng)):
        index = _transformed(pool, arrays[photo], ids[photo], name, LIGHTINGS[name], (seed, 1, number))
        lighting_items.append((index, name, photo))
    galleries.append(
        Gallery("lighting", "lighting", [i for i, _, _ in lighting_items], [c for _, c, _ in lighting_items])
    )

    # Palettes of the most colourful photos (never in the palette gallery), as taken and hue-rotated.
    saturation = [float(np.asarray(to_image(a).convert("HSV"))[..., 1].mean()) for a in arrays]
    references = list(np.argsort(saturation)[::-1][: sizes.palette_references])
    palettes: dict[str, np.ndarray] = {}
    for number, ref in enumerate(references):
        palette = kmeans_palette(arrays[ref], 6, np.random.default_rng([seed, 2, number]))
        name = PurePosixPath(photos[ref]["path"]).stem
        palettes[f"palette of {name}"] = palette
        palettes[f"palette of {name}, hue +{150 + 60 * (number % 2)}"] = rotate_hue(palette, 150 + 60 * (number % 2))
    others = [i for i in range(len(photos)) if i not in set(references)]
    palette_items = []
    for number, (name, slot) in enumerate(_assign(len(others), list(palettes), sizes.palette_per_class, rng)):
        photo = others[slot]
        index = _transformed(pool, arrays[photo], ids[photo], name, posterise_to(palettes[name]), (seed, 3, number))
        palette_items.append((index, name, photo))
    galleries.append(
        Gallery("color palette", "color palette", [i for i, _, _ in palette_items], [c for _, c, _ in palette_items])
    )

    style_items = []
    for number, (name, photo) in enumerate(_assign(len(photos), list(STYLES), sizes.style_per_class, rng)):
        index = _transformed(pool, arrays[photo], ids[photo], name, STYLES[name], (seed, 4, number))
        style_items.append((index, name, photo))
    galleries.append(
        Gallery("art style (i) filters", "art style", [i for i, _, _ in style_items], [c for _, c, _ in style_items])
    )

    art = capped_groups(
        [row for row in rows if row["source"] == "stellarium-data" and row["kind"] == "constellation-art"],
        sky_culture,
        MIN_CULTURE,
        CULTURE_CAP,
        np.random.default_rng([seed, 5]),
    )
    check_heldout([row for row, _ in art])
    indices = [pool.add(load_image(root, row), row["id"], "untransformed") for row, _ in art]
    galleries.append(Gallery("art style (ii) sky cultures", "art style", indices, [group for _, group in art]))

    stamps = capped_groups(
        [row for row in rows if row["source"] == "tuxpaint-stamps-default"],
        stamp_category,
        MIN_STAMP_GROUP,
        STAMP_CAP,
        np.random.default_rng([seed, 6]),
    )
    check_heldout([row for row, _ in stamps])
    indices = [
        pool.add(load_image(root, row, background=(255, 255, 255)), row["id"], "untransformed") for row, _ in stamps
    ]
    galleries.append(Gallery("subject (i) stamps", "subject", indices, [group for _, group in stamps]))

    same_photo = [(i, ids[p]) for i, _, p in lighting_items + style_items]
    counts = Counter(origin for _, origin in same_photo)
    same_photo = [(i, origin) for i, origin in same_photo if counts[origin] >= 2]
    galleries.append(
        Gallery("subject (ii) same photo", "subject", [i for i, _ in same_photo], [o for _, o in same_photo])
    )

    pairs = delta_pairs(
        lighting_items, palette_items, style_items, sizes.delta_pairs_per_kind, np.random.default_rng([seed, 7])
    )
    return Benchmark(pool=pool, galleries=galleries, pairs=pairs)


def delta_pairs(lighting_items, palette_items, style_items, per_kind: int, rng) -> list[tuple[int, int, str, str]]:
    """Pairs of pool images with one shared attribute (positive) and one that differs (negative), `per_kind` each."""

    def sample(items, same_class: bool, positive: str, negative: str) -> list[tuple[int, int, str, str]]:
        candidates = [
            (a[0], b[0], positive, negative)
            for n, a in enumerate(items)
            for b in items[n + 1 :]
            if (a[1] == b[1]) == same_class and (a[2] == b[2]) != same_class
        ]
        picks = rng.permutation(len(candidates))[:per_kind]
        return [candidates[i] for i in sorted(picks)]

    return (
        sample(lighting_items, True, "lighting", "subject")  # same lighting class, different photo
        + sample(lighting_items, False, "subject", "lighting")  # same photo, different lighting class
        + sample(style_items, True, "art style", "subject")
        + sample(style_items, False, "subject", "art style")
        + sample(palette_items, True, "color palette", "subject")
    )


# ---------------------------------------------------------------------------------------------------------
# Scoring


def chance_scores(groups: Sequence[str], k: int = DEFAULT_K) -> RetrievalScores:
    """Expected mAP@k / P@k of a random ranking, from the group sizes (constant embedding, ties in expectation)."""
    return retrieval_scores(np.ones((len(groups), 1)), groups, k)


@dataclass
class ModelScores:
    """One model's retrieval per (gallery, phrase) and Delta per phrase set (None for the holistic trunk)."""

    retrieval: dict[tuple[str, int], RetrievalScores]
    delta: dict[int, tuple[float, float, float]] | None


def score(embedder, benchmark: Benchmark, conditioned: bool, k: int = DEFAULT_K) -> ModelScores:
    """Embed the pool once under every phrase, then score each gallery (both phrases) and the Delta pairs."""
    phrases = [phrase for pair in ATTRIBUTES.values() for phrase in pair]
    pooled = embedder.embed_grid(benchmark.pool.images, phrases).double().numpy()  # (N, P, d)
    column = {(attribute, p): phrases.index(ATTRIBUTES[attribute][p]) for attribute in ATTRIBUTES for p in (0, 1)}
    retrieval = {
        (gallery.name, p): retrieval_scores(pooled[gallery.indices, column[(gallery.attribute, p)]], gallery.groups, k)
        for gallery in benchmark.galleries
        for p in (0, 1)
    }
    if not conditioned:
        return ModelScores(retrieval, None)
    delta = {}
    for p in (0, 1):
        per_pair = []
        for x, y, positive, negative in benchmark.pairs:
            cos = [float(pooled[x, column[(a, p)]] @ pooled[y, column[(a, p)]]) for a in (positive, negative)]
            per_pair.append(([cos[0]], [cos[1]]))
        delta[p] = delta_pos_neg(per_pair)
    return ModelScores(retrieval, delta)


# ---------------------------------------------------------------------------------------------------------
# Report


ROWS = {  # report row -> the galleries averaged into it
    "lighting": ["lighting"],
    "color palette": ["color palette"],
    "art style (i) filters": ["art style (i) filters"],
    "art style (ii) sky cultures": ["art style (ii) sky cultures"],
    "art style (mean)": ["art style (i) filters", "art style (ii) sky cultures"],
    "subject (i) stamps": ["subject (i) stamps"],
    "subject (ii) same photo": ["subject (ii) same photo"],
    "subject (mean)": ["subject (i) stamps", "subject (ii) same photo"],
}
GOAL_ROWS = {
    "lighting": "lighting",
    "color palette": "color palette",
    "art style (mean)": "art style",
    "subject (mean)": "subject",
}


def _mean(scores: Sequence[RetrievalScores]) -> tuple[float, float]:
    return float(np.mean([s.map_at_k for s in scores])), float(np.mean([s.precision_at_k for s in scores]))


def report(benchmark: Benchmark, results: Mapping[str, ModelScores], k: int = DEFAULT_K) -> tuple[str, dict]:
    """The Markdown tables (typed phrase, paraphrase, goals, Delta) and the same numbers as a dict for JSON."""
    chance = {g.name: chance_scores(g.groups, k) for g in benchmark.galleries}
    trunk = "holistic (trunk)"
    models = [name for name in results if name != trunk]
    data: dict = {"k": k, "galleries": {g.name: g.summary() for g in benchmark.galleries}, "rows": {}, "delta": {}}
    lines = []
    for p, title in ((0, "typed phrase"), (1, "paraphrase")):
        header = ["attribute (gallery)", "phrase", "chance", trunk, *models]
        lines += [f"### mAP@{k} / P@{k}, {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row, names in ROWS.items():
            attribute = next(g.attribute for g in benchmark.galleries if g.name == names[0])
            cells = {"chance": _mean([chance[n] for n in names])}
            cells.update({model: _mean([results[model].retrieval[(n, p)] for n in names]) for model in results})
            data["rows"].setdefault(row, {})[title] = cells
            text = " | ".join(
                f"{m:.3f} / {pr:.3f}" for m, pr in (cells["chance"], cells[trunk], *(cells[m] for m in models))
            )
            lines.append(f"| {row} | '{ATTRIBUTES[attribute][p]}' | {text} |")
        lines.append("")
    if models:
        lines += ["### Goals (issue 17), typed phrase, mAP@10", ""]
        lines += ["| attribute | goal | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
        for row, attribute in GOAL_ROWS.items():
            cells = data["rows"][row]["typed phrase"]
            holistic, random = cells[trunk][0], cells["chance"][0]
            if attribute == "subject":
                goal = f">= trunk {holistic:.3f}"
                verdicts = [f"{cells[m][0]:.3f} ({'met' if cells[m][0] >= holistic else 'not met'})" for m in models]
            else:
                need = max(1.5 * holistic, 2 * random)
                goal = f">= 1.5 x trunk and 2 x chance = {need:.3f}"
                verdicts = [f"{cells[m][0]:.3f} ({'met' if cells[m][0] >= need else 'not met'})" for m in models]
            lines.append(f"| {attribute} | {goal} | " + " | ".join(verdicts) + " |")
        lines.append("")
    kinds = Counter(f"+{pos} / -{neg}" for _, _, pos, neg in benchmark.pairs)
    kinds_text = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    lines += [
        f"### Delta(pos, neg) on {len(benchmark.pairs)} held-out pairs ({kinds_text}); goal >= 0.5",
        "",
        "| model | phrases | mean cos, positive | mean cos, negative | Delta |",
        "|---|---|---|---|---|",
        f"| {trunk} | any | - | - | 0 (by construction: one vector for every attribute) |",
    ]
    for model in models:
        for p, title in ((0, "typed"), (1, "paraphrase")):
            value, positive, negative = results[model].delta[p]
            data["delta"].setdefault(model, {})[title] = {"delta": value, "positive": positive, "negative": negative}
            lines.append(f"| {model} | {title} | {positive:.3f} | {negative:.3f} | {value:.3f} |")
    return "\n".join(lines) + "\n", data


def contact_sheets(
    benchmark: Benchmark, directory: Path, rows_per_sheet: int = 10, per_row: int = 6, thumb: int = 96
) -> list[Path]:
    """One PNG per gallery: a few groups as rows of thumbnails, the group name on the left."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for gallery in benchmark.galleries:
        by_group: dict[str, list[int]] = defaultdict(list)
        for index, group in zip(gallery.indices, gallery.groups, strict=True):
            by_group[group].append(index)
        groups = sorted(by_group)[:rows_per_sheet] if len(by_group) > rows_per_sheet else sorted(by_group)
        label = 240
        sheet = Image.new("RGB", (label + per_row * (thumb + 4), len(groups) * (thumb + 4)), "white")
        draw = ImageDraw.Draw(sheet)
        for r, group in enumerate(groups):
            draw.text((4, r * (thumb + 4) + thumb // 2 - 6), group[:40], fill="black")
            for c, index in enumerate(by_group[group][:per_row]):
                sheet.paste(
                    benchmark.pool.images[index].resize((thumb, thumb)), (label + c * (thumb + 4), r * (thumb + 4))
                )
        path = directory / f"heldout_real_{gallery.name.replace(' ', '_').replace('(', '').replace(')', '')}.png"
        sheet.save(path)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None, sizes: Sizes = Sizes()) -> int:
    """Build the benchmark, score the trunk and every --model, print the tables, write JSON and contact sheets."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=[], metavar="[NAME=]DIR", help="encoder directory")
    parser.add_argument("--manifest", type=Path, required=True, help="realdata manifest.jsonl (images beside it)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/heldout_real.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-sheets", action="store_true", help="skip the contact sheet PNGs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # before the trunk baseline runs too (the encoder sets it when built)
    started = time.perf_counter()
    benchmark = build_benchmark(args.manifest, seed=args.seed, sizes=sizes)
    print(
        f"{len(benchmark.pool.images)} images embedded once per model (built in {time.perf_counter() - started:.0f} s)"
    )
    for gallery in benchmark.galleries:
        print(f"  {gallery.name}: {gallery.summary()}")
    if not args.no_sheets:
        sheets = contact_sheets(benchmark, args.out.parent)
        print(f"contact sheets: {', '.join(str(p) for p in sheets)}")
    results = {}
    timings = {}
    for name, path, conditioned in [("holistic (trunk)", None, False)] + [(*_named(item), True) for item in args.model]:
        start = time.perf_counter()
        embedder = HolisticTrunkEmbedder(SIZE) if path is None else as_embedder(path)
        results[name] = score(embedder, benchmark, conditioned)
        timings[name] = time.perf_counter() - start
    text, data = report(benchmark, results)
    data["seconds"] = {name: round(t, 1) for name, t in timings.items()}
    data["command"] = " ".join(["python bench/heldout_real.py", *(argv if argv is not None else sys.argv[1:])])
    print()
    print(text)
    print("seconds per model: " + ", ".join(f"{n} {t:.0f}" for n, t in timings.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2))
    return 0


def _named(item: str) -> tuple[str, str]:
    name, sep, path = item.partition("=")
    return (name, path) if sep else (item, item)


if __name__ == "__main__":
    sys.exit(main())
