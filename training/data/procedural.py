"""Procedural pair generator: images composed from known factors, pairs that share some and differ in others.

Run `python -m training.data.procedural --out DIR --pairs N --seed S [--size 128]` to write a pair dataset
(training/data/pairs.py format) with `factors_x`/`factors_y` and the factor name behind every attribute phrase.

A factor is a registry entry (name -> values, caption phrase, paraphrases, render hook). An image is fully
determined by its factor values plus a nuisance `jitter_seed` (small shifts of the background crop, the
subject position and scale that no factor names), so `render_image` can rebuild any gallery image, including
factor combinations that training never saw (`hold_out`).

Rendering order: the subject stage builds the object (identity, then colour, material, pose), the frame
stage places it (layout) and draws the backdrop (background), the two are composited, and the image stage
changes the whole picture (lighting, then style). `category` has no hook: its value shows through identity,
which always belongs to the category (changing the category changes the identity).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps
from scipy.spatial import cKDTree

from training.data.pairs import PAIRS_FILENAME, PairRecord, write_pairs
from training.data.procedural_assets import BACKGROUNDS, MATERIALS, SUBJECTS, Assets, assets_for_size

SOURCE = "procedural"
GENERATOR_VERSION = 1


@dataclass
class Scene:
    """The image being rendered; each factor's hook reads and updates the fields of its stage."""

    assets: Assets
    jitter: np.random.Generator | None
    # subject stage, in the subject's own frame
    subject_rgb: np.ndarray | None = None  # (S, S, 3) float in [0, 1], S = assets.subject_size
    subject_alpha: np.ndarray | None = None  # (S, S)
    subject_is_photo: bool = False
    subject_layer: Image.Image | None = None  # RGBA after pose: tight box around the rotated subject
    # frame stage, in image coordinates
    canvas_rgb: np.ndarray | None = None  # (size, size, 3) subject pixels placed in the frame
    canvas_alpha: np.ndarray | None = None  # (size, size)
    background: np.ndarray | None = None  # (size, size, 3)
    # image stage
    image: np.ndarray | None = None  # (size, size, 3) float in [0, 1]

    @property
    def size(self) -> int:
        """The output side in pixels."""
        return self.assets.size


@dataclass(frozen=True)
class Factor:
    """One known factor of variation: its values, how a caption names a value, the words for it, its renderer."""

    name: str
    stage: str  # "subject", "frame" or "image": when its hook runs (see the module docstring)
    paraphrases: tuple[str, ...]  # open-vocabulary names of this attribute, used as positive/negative phrases
    describe: Callable[[str], str]  # value -> caption phrase
    render: Callable[[Scene, str], None] | None  # None: the factor shows through another one (category)
    choices: Callable[[Mapping[str, str]], tuple[str, ...]]  # allowed values given the earlier factors' values
    depends_on: tuple[str, ...] = ()  # when one of these changes, this factor must be re-sampled too
    weights: Mapping[str, float] = field(default_factory=dict)  # relative draw weight of a value (default 1)

    def draw(self, options: Sequence[str], rng: np.random.Generator) -> str:
        """One of `options`, drawn with this factor's value weights."""
        if not self.weights:
            return options[int(rng.integers(len(options)))]
        weights = np.array([self.weights.get(option, 1.0) for option in options])
        return options[int(rng.choice(len(options), p=weights / weights.sum()))]

    def values(self) -> tuple[str, ...]:
        """Every value of this factor, whatever the other factors are."""
        return self.choices({})


# ---------------------------------------------------------------------------------------------------------
# Subject stage


def _render_identity(scene: Scene, value: str) -> None:
    subject = scene.assets.subject(value)
    scene.subject_rgb = subject.rgb
    scene.subject_alpha = subject.alpha
    scene.subject_is_photo = subject.is_photo


COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.1),
    "orange": (0.98, 0.52, 0.08),
    "yellow": (0.98, 0.86, 0.12),
    "green": (0.22, 0.7, 0.2),
    "teal": (0.05, 0.6, 0.58),
    "blue": (0.12, 0.3, 0.9),
    "purple": (0.5, 0.2, 0.75),
    "pink": (0.98, 0.5, 0.72),
    "brown": (0.52, 0.3, 0.14),
    "white": (0.96, 0.96, 0.94),
    "black": (0.16, 0.16, 0.17),
}


def _render_color(scene: Scene, value: str) -> None:
    color = np.array(COLORS[value], np.float32)
    if scene.subject_is_photo:
        # Recolour a photo through its luminance, keeping a little of its own colour so it stays recognisable.
        luminance = scene.subject_rgb @ np.array([0.299, 0.587, 0.114], np.float32)
        tinted = np.clip(luminance[:, :, None] * color * 1.7, 0.0, 1.0)
        scene.subject_rgb = 0.72 * tinted + 0.28 * scene.subject_rgb
    else:
        scene.subject_rgb = scene.subject_rgb * color


def _render_material(scene: Scene, value: str) -> None:
    strength = 0.6 if scene.subject_is_photo else 0.9
    texture = scene.assets.texture(value)
    scene.subject_rgb = np.clip(scene.subject_rgb * (1.0 - strength + strength * texture[:, :, None]), 0.0, 1.0)


POSES: dict[str, tuple[int, bool]] = {}  # value -> (counter-clockwise degrees, mirrored)
for _angle in (0, 30, 60, 90, 180, 270, 300, 330):
    for _mirrored in (False, True):
        POSES[f"rot{_angle:03d}{'-mirrored' if _mirrored else ''}"] = (_angle, _mirrored)


def describe_pose(value: str) -> str:
    """Caption words for a POSES value, e.g. "mirrored and upright"."""
    angle, mirrored = POSES[value]
    if angle == 0:
        text = "upright"
    elif angle == 180:
        text = "upside down"
    elif angle == 90:
        text = "turned a quarter turn to the left"
    elif angle == 270:
        text = "turned a quarter turn to the right"
    elif angle < 180:
        text = f"tilted {angle} degrees to the left"
    else:
        text = f"tilted {360 - angle} degrees to the right"
    return f"mirrored and {text}" if mirrored else text


def _render_pose(scene: Scene, value: str) -> None:
    angle, mirrored = POSES[value]
    rgba = np.dstack([scene.subject_rgb, scene.subject_alpha])
    layer = Image.fromarray((rgba * 255.0 + 0.5).astype(np.uint8), "RGBA")  # both already in [0, 1]
    if mirrored:
        layer = ImageOps.mirror(layer)
    if angle:
        layer = layer.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    scene.subject_layer = layer.crop(layer.getchannel("A").getbbox())


# ---------------------------------------------------------------------------------------------------------
# Frame stage

_POSITIONS = {
    "top-left": (-1, -1), "top": (0, -1), "top-right": (1, -1),
    "left": (-1, 0), "center": (0, 0), "right": (1, 0),
    "bottom-left": (-1, 1), "bottom": (0, 1), "bottom-right": (1, 1),
}  # fmt: skip
_SCALES = {"small": 0.36, "medium": 0.54, "large": 0.76}  # side of the subject's box / image side
LAYOUTS = {f"{scale}-{position}": (scale, position) for scale in _SCALES for position in _POSITIONS}


def describe_layout(value: str) -> str:
    """Caption words for a LAYOUTS value, e.g. "small and at the top left of the frame"."""
    scale, position = LAYOUTS[value]
    where = "in the center" if position == "center" else f"at the {position.replace('-', ' ')} of the frame"
    return f"{scale} and {where}"


def _render_layout(scene: Scene, value: str) -> None:
    scene.canvas_rgb, scene.canvas_alpha = place_layer(scene.subject_layer, value, scene.size, scene.jitter)


def place_layer(
    layer: Image.Image, value: str, size: int, jitter: np.random.Generator | None
) -> tuple[np.ndarray, np.ndarray]:
    """An RGBA layer scaled and placed in a (size, size) frame by a LAYOUTS value: its rgb (size, size, 3), alpha."""
    scale_name, position = LAYOUTS[value]
    scale = _SCALES[scale_name]
    shift_x = shift_y = 0.0
    if jitter is not None:
        scale *= jitter.uniform(0.93, 1.07)
        shift_x, shift_y = jitter.uniform(-0.03, 0.03, size=2) * size
    fit = scale * size / max(layer.size)
    width, height = max(1, round(layer.size[0] * fit)), max(1, round(layer.size[1] * fit))
    layer = layer.resize((width, height), Image.Resampling.BILINEAR)
    column, row = _POSITIONS[position]
    center_x = size / 2 + column * (size - width) / 2 * 0.92 + shift_x
    center_y = size / 2 + row * (size - height) / 2 * 0.92 + shift_y
    left, top = round(center_x - width / 2), round(center_y - height / 2)
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    canvas.paste(layer, (left, top))
    pixels = np.asarray(canvas, dtype=np.float32) / 255.0
    return pixels[:, :, :3], pixels[:, :, 3]


def _render_background(scene: Scene, value: str) -> None:
    backdrop = scene.assets.background(value)
    margin = scene.assets.margin
    top = left = margin
    if scene.jitter is not None:
        top, left = scene.jitter.integers(0, 2 * margin + 1, size=2)
    scene.background = backdrop[top : top + scene.size, left : left + scene.size]


# ---------------------------------------------------------------------------------------------------------
# Image stage

_LIGHT_DIRECTIONS = {  # value -> unit vector (x right, y down) pointing from the image centre to the light
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "top": (0.0, -1.0), "bottom": (0.0, 1.0),
    "top-left": (-0.7, -0.7), "top-right": (0.7, -0.7), "front": (0.0, 0.0),
}  # fmt: skip
_LIGHT_TINTS = {"neutral": (1.0, 1.0, 1.0), "warm": (1.12, 0.96, 0.72), "cool": (0.78, 0.92, 1.15)}
_LIGHT_LEVELS = {"dim": 0.62, "normal": 1.0, "bright": 1.3}
LIGHTINGS = {
    f"{direction}/{tint}/{level}": (direction, tint, level)
    for direction in _LIGHT_DIRECTIONS
    for tint in _LIGHT_TINTS
    for level in _LIGHT_LEVELS
}


def _describe_lighting(value: str) -> str:
    direction, tint, level = LIGHTINGS[value]
    where = "from the front" if direction == "front" else f"from the {direction.replace('-', ' ')}"
    light = {"neutral": "white light", "warm": "warm golden light", "cool": "cool bluish light"}[tint]
    amount = {"dim": "dim ", "normal": "", "bright": "bright "}[level]
    return f"lit {where} by {amount}{light}"


def _render_lighting(scene: Scene, value: str) -> None:
    direction, tint, level = LIGHTINGS[value]
    size = scene.size
    light_x, light_y = _LIGHT_DIRECTIONS[direction]
    # Cast shadow: the subject's coverage pushed away from the light, blurred, darkening what lies behind.
    offset_x = round(-light_x * size * 0.05)
    offset_y = round((-light_y if direction != "front" else 0.5) * size * 0.05)
    shadow = np.roll(scene.canvas_alpha, (offset_y, offset_x), axis=(0, 1))
    shadow_image = Image.fromarray((shadow * 255).astype(np.uint8)).filter(ImageFilter.BoxBlur(size / 48))
    shadow = np.asarray(shadow_image, dtype=np.float32) / 255.0
    image = scene.image * (1.0 - 0.5 * shadow * (1.0 - scene.canvas_alpha))[:, :, None]
    gain = _light_ramp(size, direction)[:, :, None] * np.array(_LIGHT_TINTS[tint], np.float32) * _LIGHT_LEVELS[level]
    scene.image = np.clip(image * gain, 0.0, 1.0)


@functools.cache
def _light_ramp(size: int, direction: str) -> np.ndarray:
    """Fall-off (size, size): brightest on the lit side, a linear ramp across the frame (flat for frontal light)."""
    light_x, light_y = _LIGHT_DIRECTIONS[direction]
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    return 1.0 + 0.42 * (axis[None, :] * light_x + axis[:, None] * light_y)


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8))


def _from_pil(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0


def _luminance(image: np.ndarray) -> np.ndarray:
    return image @ np.array([0.299, 0.587, 0.114], np.float32)


def _style_posterized(image: np.ndarray, size: int) -> np.ndarray:
    return np.round(image * 3.0) / 3.0


def _style_pencil(image: np.ndarray, size: int) -> np.ndarray:
    # Colour-dodge sketch: grey divided by its blurred negative leaves only the edges dark.
    gray = _luminance(image)
    blurred = _from_pil(_to_pil(1.0 - gray).filter(ImageFilter.GaussianBlur(max(1.0, size / 48))))
    sketch = np.clip(gray / np.maximum(1.0 - blurred, 1e-3), 0.0, 1.0) ** 3
    pastel = 0.55 * image + 0.45
    return sketch[:, :, None] * pastel


def _style_watercolor(image: np.ndarray, size: int) -> np.ndarray:
    soft = _from_pil(_to_pil(image).filter(ImageFilter.GaussianBlur(max(1.0, size / 64))))
    washed = np.round(soft * 5.0) / 5.0 * 0.7 + soft * 0.3
    edges = _from_pil(_to_pil(washed).filter(ImageFilter.FIND_EDGES)).max(axis=2)
    paper = 0.96 + 0.04 * np.random.default_rng(7).random((size, size), dtype=np.float32)
    return np.clip((washed * 0.8 + 0.2) * (1.0 - 0.6 * edges)[:, :, None] * paper[:, :, None], 0.0, 1.0)


def _style_pixel_art(image: np.ndarray, size: int) -> np.ndarray:
    small = _to_pil(image).resize((max(8, size // 4),) * 2, Image.Resampling.BOX)  # 4-pixel blocks
    return np.round(_from_pil(small.resize((size, size), Image.Resampling.NEAREST)) * 4.0) / 4.0


def _style_halftone(image: np.ndarray, size: int) -> np.ndarray:
    # One dot screen per ink (cyan, magenta, yellow): a dot's area grows with the ink a cell needs.
    cell = max(3, size // 28)
    cells = _from_pil(_to_pil(image).resize((size // cell,) * 2, Image.Resampling.BOX).resize((size, size)))
    out = np.empty_like(image)
    for channel, shift in enumerate((0, cell // 3, 2 * cell // 3)):
        coordinates = (np.arange(size) + shift) % cell - (cell - 1) / 2
        distance = np.sqrt(coordinates[None, :] ** 2 + coordinates[:, None] ** 2) / cell
        ink = 1.0 - cells[:, :, channel]
        out[:, :, channel] = np.where(distance < 0.62 * np.sqrt(ink), 0.08, 0.97)
    return out


def _style_cartoon(image: np.ndarray, size: int) -> np.ndarray:
    smooth = _from_pil(_to_pil(image).filter(ImageFilter.GaussianBlur(max(0.8, size / 100))))
    flat = np.round(smooth * 3.0) / 3.0 * 0.85 + 0.1
    edges = _from_pil(_to_pil(smooth).convert("L").filter(ImageFilter.FIND_EDGES))
    return np.clip(flat * (edges < 0.12)[:, :, None], 0.0, 1.0)


def _style_soft_focus(image: np.ndarray, size: int) -> np.ndarray:
    blurred = _from_pil(_to_pil(image).filter(ImageFilter.GaussianBlur(size / 40)))
    return 1.0 - (1.0 - blurred) * (1.0 - 0.35 * blurred)  # a screen blend of the blur: a glow


def _style_film_grain(image: np.ndarray, size: int) -> np.ndarray:
    grain = np.random.default_rng(5).normal(0.0, 0.05, (size, size, 1)).astype(np.float32)
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    vignette = 1.0 - 0.35 * (axis[None, :] ** 2 + axis[:, None] ** 2)
    faded = image * 0.85 + np.array([0.08, 0.06, 0.02], np.float32)
    return np.clip((faded + grain) * vignette[:, :, None], 0.0, 1.0)


@functools.cache
def _mosaic_tiles(size: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed Voronoi tiling: the tile index of each pixel (size * size,) and a mask of tile borders."""
    rng = np.random.default_rng(3)
    count = max(16, (size // 7) ** 2)
    seeds = rng.random((count, 2)) * size
    pixels = np.stack(np.mgrid[0:size, 0:size], axis=-1).reshape(-1, 2)  # (P, 2) as (y, x)
    _, tiles = cKDTree(seeds).query(pixels)  # nearest seed per pixel, without a (P, T) distance matrix
    grid = tiles.reshape(size, size)
    border = (grid != np.roll(grid, 1, axis=0)) | (grid != np.roll(grid, 1, axis=1))
    return tiles, border


def _style_mosaic(image: np.ndarray, size: int) -> np.ndarray:
    tiles, border = _mosaic_tiles(size)
    count = int(tiles.max()) + 1
    pixels = image.reshape(-1, 3)
    area = np.maximum(np.bincount(tiles, minlength=count), 1)
    means = np.stack([np.bincount(tiles, pixels[:, c], minlength=count) / area for c in range(3)], axis=1)
    out = means[tiles].reshape(size, size, 3).astype(np.float32)
    return out * np.where(border, 0.55, 1.0)[:, :, None]


STYLES: dict[str, tuple[str, Callable[[np.ndarray, int], np.ndarray] | None]] = {
    # value: (caption opening, filter over the (size, size, 3) image)
    "photographic": ("A photo of", None),
    "posterized": ("A posterized picture of", _style_posterized),
    "pencil-sketch": ("A colored-pencil sketch of", _style_pencil),
    "watercolor": ("A watercolor painting of", _style_watercolor),
    "pixel-art": ("Pixel art of", _style_pixel_art),
    "halftone": ("A halftone print of", _style_halftone),
    "cartoon": ("A cartoon drawing of", _style_cartoon),
    "soft-focus": ("A dreamy soft-focus photo of", _style_soft_focus),
    "film-grain": ("A grainy vintage film photo of", _style_film_grain),
    "mosaic": ("A mosaic of", _style_mosaic),
}


def _render_style(scene: Scene, value: str) -> None:
    style_filter = STYLES[value][1]
    if style_filter is not None:
        scene.image = np.clip(style_filter(scene.image, scene.size), 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# The registry


def _static(values: Iterable[str]) -> Callable[[Mapping[str, str]], tuple[str, ...]]:
    frozen = tuple(values)
    return lambda _assignment: frozen


_CATEGORIES = tuple(dict.fromkeys(spec.category for spec in SUBJECTS.values()))


_IDENTITIES_BY_CATEGORY = {
    category: tuple(identity for identity, spec in SUBJECTS.items() if spec.category == category)
    for category in _CATEGORIES
}
_ALL_IDENTITIES = tuple(SUBJECTS)


def _identity_choices(assignment: Mapping[str, str]) -> tuple[str, ...]:
    category = assignment.get("category")
    return _ALL_IDENTITIES if category is None else _IDENTITIES_BY_CATEGORY.get(category, ())


FACTORS: dict[str, Factor] = {
    factor.name: factor
    for factor in (
        Factor(
            name="category",
            stage="subject",
            paraphrases=(
                "object category",
                "subject category",
                "kind of object",
                "object type",
                "what the object is",
                "class of the subject",
                "type of subject",
                "object class",
            ),
            describe=lambda value: value,
            render=None,
            choices=_static(_CATEGORIES),
        ),
        Factor(
            name="identity",
            stage="subject",
            paraphrases=(
                "subject identity",
                "object identity",
                "the specific object",
                "identity of the subject",
                "the exact object instance",
                "which particular object it is",
                "object instance",
                "the main subject's identity",
            ),
            describe=lambda value: SUBJECTS[value].noun,
            render=_render_identity,
            choices=_identity_choices,
            depends_on=("category",),
        ),
        Factor(
            name="color",
            stage="subject",
            paraphrases=(
                "subject color",
                "object colour",
                "color of the object",
                "the subject's colour",
                "hue of the main object",
                "object color",
                "main subject colour",
                "colour of the subject",
            ),
            describe=lambda value: value,
            render=_render_color,
            choices=_static(COLORS),
        ),
        Factor(
            name="material",
            stage="subject",
            paraphrases=(
                "material",
                "surface texture",
                "object material",
                "texture of the object",
                "surface pattern",
                "what the object is made of",
                "surface finish",
                "material and texture",
            ),
            describe=lambda value: MATERIALS[value][0],
            render=_render_material,
            choices=_static(MATERIALS),
        ),
        Factor(
            name="pose",
            stage="subject",
            paraphrases=(
                "pose",
                "orientation",
                "object orientation",
                "rotation of the subject",
                "subject pose",
                "how the object is turned",
                "angle of the object",
                "tilt and mirroring",
            ),
            describe=describe_pose,
            render=_render_pose,
            choices=_static(POSES),
        ),
        Factor(
            name="layout",
            stage="frame",
            paraphrases=(
                "layout",
                "composition",
                "subject placement",
                "position and size of the subject",
                "framing",
                "where the object sits in the frame",
                "spatial arrangement",
                "object scale and position",
            ),
            describe=describe_layout,
            render=_render_layout,
            choices=_static(LAYOUTS),
        ),
        Factor(
            name="background",
            stage="frame",
            paraphrases=(
                "background",
                "backdrop",
                "setting behind the subject",
                "scene background",
                "the background",
                "surroundings",
                "environment behind the object",
                "background scene",
            ),
            describe=lambda value: BACKGROUNDS[value][0],
            render=_render_background,
            choices=_static(BACKGROUNDS),
        ),
        Factor(
            name="lighting",
            stage="image",
            paraphrases=(
                "lighting",
                "illumination",
                "the light",
                "scene lighting",
                "image lighting",
                "lighting conditions",
                "how the scene is lit",
                "light setup",
            ),
            describe=_describe_lighting,
            render=_render_lighting,
            choices=_static(LIGHTINGS),
        ),
        Factor(
            name="style",
            stage="image",
            paraphrases=(
                "art style",
                "rendering style",
                "artistic style",
                "visual style",
                "image style",
                "drawing technique",
                "artistic medium",
                "aesthetic",
            ),
            describe=lambda value: STYLES[value][0],
            render=_render_style,
            choices=_static(STYLES),
            # Real photos are what the encoder is judged on: a third of the images are unfiltered.
            weights={"photographic": 4.5},
        ),
    )
}


def factor_parts(name: str, value: str) -> dict[str, str]:
    """The parts of a composite factor's value (empty for the others), for reports that ask which part a model
    gets right: lighting -> direction, tint, level; layout -> scale, position; pose -> rotation, mirrored."""
    if name == "lighting":
        return dict(zip(("direction", "tint", "level"), LIGHTINGS[value], strict=True))
    if name == "layout":
        return dict(zip(("scale", "position"), LAYOUTS[value], strict=True))
    if name == "pose":
        rotation, _, mirrored = value.partition("-")
        return {"rotation": rotation, "mirrored": "yes" if mirrored else "no"}
    return {}


def check_factor_names(names: Iterable[str]) -> None:
    """Raise ValueError naming the first unknown factor and listing the known ones."""
    for name in names:
        if name not in FACTORS:
            raise ValueError(f"unknown factor {name!r}; known factors: {', '.join(FACTORS)}")


def check_factor_values(values: Mapping[str, str], *, complete: bool = True) -> None:
    """Raise ValueError for an unknown factor, a value it does not have, or (complete) a missing factor."""
    check_factor_names(values)
    if complete:
        missing = [name for name in FACTORS if name not in values]
        if missing:
            raise ValueError(f"factor value(s) missing for {', '.join(missing)}; give a value for every factor")
    for name, value in values.items():
        allowed = FACTORS[name].choices(values if complete else {})
        if value not in allowed:
            shown = ", ".join(allowed[:12]) + (", ..." if len(allowed) > 12 else "")
            raise ValueError(f"{value!r} is not a value of factor {name!r} here; choose one of: {shown}")


# ---------------------------------------------------------------------------------------------------------
# Rendering and captions


def render_image(factors: Mapping[str, str], *, size: int = 128, jitter_seed: int | None = None) -> Image.Image:
    """Render one RGB image from a value for every factor; jitter_seed adds the small nuisance shifts."""
    check_factor_values(factors)
    scene = Scene(
        assets=assets_for_size(size), jitter=None if jitter_seed is None else np.random.default_rng(jitter_seed)
    )
    for stage in ("subject", "frame"):
        for factor in FACTORS.values():
            if factor.stage == stage and factor.render is not None:
                factor.render(scene, factors[factor.name])
    alpha = scene.canvas_alpha[:, :, None]
    scene.image = scene.canvas_rgb * alpha + scene.background * (1.0 - alpha)
    for factor in FACTORS.values():
        if factor.stage == "image" and factor.render is not None:
            factor.render(scene, factors[factor.name])
    return _to_pil(scene.image)


def caption_for(factors: Mapping[str, str], template: int = 0) -> str:
    """A caption describing an image from its factor values; template 0-2 varies the wording."""
    phrase = {name: FACTORS[name].describe(value) for name, value in factors.items()}
    subject = f"{phrase['color']} {phrase['material']} {phrase['identity']}"
    subject = f"{'an' if subject[0] in 'aeiou' else 'a'} {subject}"
    if template == 0:
        return (
            f"{phrase['style']} {subject}, {phrase['pose']}, {phrase['layout']}, {phrase['background']}, "
            f"{phrase['lighting']}."
        )
    if template == 1:
        return (
            f"{phrase['style']} {subject} {phrase['background']}, {phrase['lighting']}; the object is "
            f"{phrase['pose']} and sits {phrase['layout']}."
        )
    return f"{phrase['style']} {subject} {phrase['background']}, {phrase['lighting']}."


# ---------------------------------------------------------------------------------------------------------
# Sampling factors and pairs


def _matches(values: Mapping[str, str], combos: Sequence[Mapping[str, str]]) -> bool:
    return any(all(values[name] == value for name, value in combo.items()) for combo in combos)


def check_hold_out(hold_out: Sequence[Mapping[str, str]]) -> None:
    """Raise ValueError for a held-out combination with an unknown factor or value, or no factor at all."""
    for combo in hold_out:
        if not combo:
            raise ValueError("an empty hold-out combination would hold out every image; name at least one factor")
        check_factor_values(combo, complete=False)


def sample_factors(
    rng: np.random.Generator, *, hold_out: Sequence[Mapping[str, str]] = (), fixed: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Factor values drawn in registry order (uniform unless a factor has weights), avoiding held-out combinations.

    A hold-out combination is a partial assignment such as {"category": "star", "color": "red"}: no image
    that matches all of it is drawn. `fixed` pins factors to given values; an evaluation gallery of unseen
    combinations is drawn with fixed=<a held-out combination> and no hold_out.
    """
    fixed = dict(fixed or {})
    check_factor_values(fixed, complete=False)
    for _attempt in range(1000):
        values: dict[str, str] = {}
        for name, factor in FACTORS.items():
            values[name] = fixed[name] if name in fixed else factor.draw(factor.choices(values), rng)
        # A fixed identity needs a category it belongs to: draws that do not fit are thrown away.
        fits = all(values[name] in FACTORS[name].choices(values) for name in fixed)
        if fits and not _matches(values, hold_out):
            return values
    raise ValueError(
        "could not draw factors that fit `fixed` and avoid the held-out combinations in 1000 tries; "
        "check that fixed values agree with each other (identity with category) and hold out fewer"
    )


def change_factor(values: Mapping[str, str], name: str, rng: np.random.Generator) -> dict[str, str]:
    """A copy of values with factor `name` set to a different value and its dependents re-drawn to fit."""
    check_factor_names([name])
    return _change_factors(values, {name}, rng)


def _change_factors(values: Mapping[str, str], names: set[str], rng: np.random.Generator) -> dict[str, str]:
    changed: dict[str, str] = {}
    for factor_name, factor in FACTORS.items():
        dependency_changed = any(changed.get(dep, values[dep]) != values[dep] for dep in factor.depends_on)
        current = values[factor_name]
        if factor_name in names or dependency_changed:
            options = factor.choices(changed)
            # Another value when there is one; a category with a single instance keeps its identity.
            others = [option for option in options if option != current]
            changed[factor_name] = factor.draw(others if others else options, rng)
        else:
            changed[factor_name] = current
    return changed


@dataclass(frozen=True)
class PairSpec:
    """A sampled pair before rendering: both factor assignments and the attribute phrases with their factors."""

    factors_x: dict[str, str]
    factors_y: dict[str, str]
    positive: tuple[tuple[str, str], ...]  # (phrase, factor name), factors equal in x and y
    negative: tuple[tuple[str, str], ...]  # (phrase, factor name), factors that differ
    caption_template_x: int = 0
    caption_template_y: int = 0
    jitter_x: int = 0
    jitter_y: int = 0


@dataclass(frozen=True)
class ProceduralConfig:
    """What pairs to draw: held-out combinations, which factors may differ within a pair, image size."""

    size: int = 128
    hold_out: tuple[Mapping[str, str], ...] = ()
    changeable: tuple[str, ...] | None = None  # None: every factor may differ
    max_changed: int | None = None  # most factors re-drawn for y (dependents come on top); None: all but one

    def __post_init__(self) -> None:
        if self.size < 32:
            raise ValueError(f"size must be at least 32 pixels, got {self.size}")
        check_hold_out(self.hold_out)
        if self.changeable is not None:
            check_factor_names(self.changeable)
            if not self.changeable:
                raise ValueError("changeable is empty, so no pair could differ; name at least one factor")
        if self.max_changed is not None and self.max_changed < 1:
            raise ValueError(f"max_changed must be at least 1, got {self.max_changed}")


def sample_pair(rng: np.random.Generator, config: ProceduralConfig = ProceduralConfig()) -> PairSpec:
    """Draw x, re-draw a random subset of its factors for y, and name the shared and differing factors."""
    changeable = list(config.changeable if config.changeable is not None else FACTORS)
    most = min(config.max_changed or len(FACTORS) - 1, len(changeable), len(FACTORS) - 1)
    for _attempt in range(1000):
        factors_x = sample_factors(rng, hold_out=config.hold_out)
        count = int(rng.integers(1, most + 1))
        to_change = {str(name) for name in rng.choice(changeable, size=count, replace=False)}
        factors_y = _change_factors(factors_x, to_change, rng)
        shared = [name for name in FACTORS if factors_x[name] == factors_y[name]]
        differing = [name for name in FACTORS if factors_x[name] != factors_y[name]]
        if shared and differing and not _matches(factors_y, config.hold_out):
            break
    else:
        raise ValueError("could not draw a pair outside the held-out combinations in 1000 tries; hold out fewer")
    positive, negative = name_attributes(rng, shared, differing, FACTORS)
    templates = rng.integers(0, 3, size=2)
    jitters = rng.integers(0, 2**31 - 1, size=2)
    return PairSpec(
        factors_x=factors_x,
        factors_y=factors_y,
        positive=positive,
        negative=negative,
        caption_template_x=int(templates[0]),
        caption_template_y=int(templates[1]),
        jitter_x=int(jitters[0]),
        jitter_y=int(jitters[1]),
    )


def name_attributes(
    rng: np.random.Generator, shared: Sequence[str], differing: Sequence[str], factors: Mapping[str, Factor]
) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """(phrase, factor) positives and negatives of a pair, each phrase one of its factor's paraphrases.

    A few of the shared factors are named (not always all, as a human annotator would) and every differing one.
    """
    kept = rng.permutation(shared)[: int(rng.integers(1, len(shared) + 1))]
    positive = tuple((str(rng.choice(factors[name].paraphrases)), str(name)) for name in kept)
    negative = tuple((str(rng.choice(factors[name].paraphrases)), str(name)) for name in rng.permutation(differing))
    return positive, negative


def pair_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for pair `index` of a run: pair i is the same whatever the number of pairs asked for."""
    return np.random.default_rng([seed, index])


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of an image, deterministic for the same pixels (no metadata, fast compression)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # level 1: 2x faster than the default, ~5% bigger
    return buffer.getvalue()


def render_pair(out: Path, seed: int, index: int, config: ProceduralConfig) -> PairRecord:
    """Draw pair `index` of run `seed`, write its two PNGs under `out`, and return its record."""
    spec = sample_pair(pair_rng(seed, index), config)
    paths = []
    for side, factors, jitter in (("x", spec.factors_x, spec.jitter_x), ("y", spec.factors_y, spec.jitter_y)):
        relative = f"images/{index // 1000:04d}/{index:07d}_{side}.png"
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(encode_png(render_image(factors, size=config.size, jitter_seed=jitter)))
        paths.append(relative)
    return PairRecord(
        image_x=paths[0],
        image_y=paths[1],
        caption_x=caption_for(spec.factors_x, spec.caption_template_x),
        caption_y=caption_for(spec.factors_y, spec.caption_template_y),
        positive=tuple(phrase for phrase, _ in spec.positive),
        negative=tuple(phrase for phrase, _ in spec.negative),
        id=f"proc-{seed}-{index}",
        source=SOURCE,
        factors_x=spec.factors_x,
        factors_y=spec.factors_y,
        positive_factors=tuple(name for _, name in spec.positive),
        negative_factors=tuple(name for _, name in spec.negative),
        meta={
            "generator_version": GENERATOR_VERSION,
            "size": config.size,
            "jitter_x": spec.jitter_x,
            "jitter_y": spec.jitter_y,
        },
    )


def generate_dataset(
    out: str | Path,
    num_pairs: int,
    seed: int,
    config: ProceduralConfig = ProceduralConfig(),
    *,
    flush_every: int = 500,
    workers: int = 1,
) -> int:
    """Write num_pairs procedural pairs (images + pairs.jsonl) into a new or empty directory; returns the count.

    `workers` > 1 renders in that many processes; the bytes written are the same for any number of workers.
    """
    out = Path(out)
    render = functools.partial(render_pair, out, seed, config=config)
    return write_dataset(out, num_pairs, render, flush_every=flush_every, workers=workers)


def write_dataset(
    out: Path, num_pairs: int, render: Callable[[int], PairRecord], *, flush_every: int = 500, workers: int = 1
) -> int:
    """Call render(i) for i < num_pairs (it writes pair i's images) and append the records in index order.

    `render` must be picklable (a module-level function or a partial of one) when `workers` > 1; the records
    and so pairs.jsonl are the same for any number of workers. Refuses a directory that already has pairs.
    """
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be at least 1, got {num_pairs}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if (out / PAIRS_FILENAME).exists():
        raise FileExistsError(f"{out / PAIRS_FILENAME} exists; pass a new --out directory (pairs are never mixed)")
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        records = pool.imap(render, range(num_pairs), chunksize=16) if pool else map(render, range(num_pairs))
        pending: list[PairRecord] = []
        written = 0
        for record in records:  # in index order either way
            pending.append(record)
            if len(pending) >= flush_every:
                written += write_pairs(out, pending)
                pending = []
        if pending:
            written += write_pairs(out, pending)
    finally:
        if pool is not None:
            pool.terminate()
    return written


# ---------------------------------------------------------------------------------------------------------
# Command line


def parse_hold_out(text: str) -> dict[str, str]:
    """One --hold-out argument, "factor=value,factor=value", as a partial assignment."""
    combo = {}
    for part in text.split(","):
        name, separator, value = part.partition("=")
        if not separator or not name.strip() or not value.strip():
            raise ValueError(f"--hold-out {text!r}: write factor=value pairs separated by commas, e.g. color=red")
        combo[name.strip()] = value.strip()
    return combo


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: write a procedural pair dataset and print a one-line JSON summary."""
    parser = argparse.ArgumentParser(prog="python -m training.data.procedural", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="new or empty directory for pairs.jsonl and images")
    parser.add_argument("--pairs", required=True, type=int, help="number of pairs to write")
    parser.add_argument("--seed", required=True, type=int, help="run seed; the same seed gives the same bytes")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument(
        "--hold-out",
        action="append",
        default=[],
        metavar="FACTOR=VALUE[,FACTOR=VALUE]",
        help="never draw images matching this combination (repeatable), e.g. category=star,color=red",
    )
    parser.add_argument(
        "--changeable",
        nargs="+",
        default=None,
        metavar="FACTOR",
        help=f"only these factors may differ within a pair (default all: {' '.join(FACTORS)})",
    )
    parser.add_argument("--max-changed", type=int, default=None, help="most factors re-drawn for image y")
    parser.add_argument("--workers", type=int, default=1, help="render in this many processes (same output)")
    args = parser.parse_args(argv)
    try:
        config = ProceduralConfig(
            size=args.size,
            hold_out=tuple(parse_hold_out(text) for text in args.hold_out),
            changeable=tuple(args.changeable) if args.changeable else None,
            max_changed=args.max_changed,
        )
        started = time.perf_counter()
        count = generate_dataset(args.out, args.pairs, args.seed, config, workers=args.workers)
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "out": str(args.out),
                "pairs": count,
                "seconds": round(seconds, 2),
                "pairs_per_second": round(count / seconds, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
