"""Real-content pair generator: real photos, cut-outs and artworks under known transforms, with recorded factors.

Run `python -m training.data.realpairs --manifest DIR/manifest.jsonl --out OUT --pairs N --seed S [--size 224]
[--workers W] [--weights lighting=2,style=1 ...]` to write a pair dataset (training/data/pairs.py format) from the
images training.data.realdata built. Only manifest rows whose source is in training.data.splits.TRAIN_SOURCES
are read; a row of a held-out source is never opened.

An image is one of three scenes: `composite` (a photo cut-out with alpha placed on a real photo background),
`photo` (a real photo on its own) or `exemplar` (a real painting, illustration or pattern, the style classes;
illustrations with alpha are placed on plain paper). The generator then recolours it with a named palette (or
not), relights it and may pass it through an art-style filter (training transforms only: training/data/
transforms.py). Every image records the value of each factor it shows, under the factor names of the procedural
generator where the meaning is the same, so the trainer's `lambda_factor` and its paraphrases serve both:

    identity    which cut-out, photo or artwork ("cutout:<manifest id>", "photo:<id>", "painting:<id>", ...)
    background  which photo is behind ("photo:<id>"), or "plain" paper behind an illustration
    layout      scale and position bucket of a placed subject (procedural LAYOUTS values)
    pose        mirrored or not (procedural POSES values "rot000" / "rot000-mirrored")
    material    the gimp pattern that re-surfaces a cut-out ("pattern:<id>"), or "natural:<id>" for its own surface
    palette     a named palette, or "natural:<content>" for unrecoloured content (equal only for the same content)
    lighting    "<exposure>/<direction>/<temperature>/<contrast>/<condition>" (factor_parts splits it), or
                "natural:<content>" when no light is changed
    style       photo | oil | watercolor | pencil | cartoon | halftone | pixel-art | painting | illustration | pattern

A factor a filter hides is not recorded for that image (a pencil sketch shows neither palette nor lighting).
A pair draws x, re-draws a weighted choice of factors for y, and names a few shared factors as positives and the
differing ones as negatives, with the procedural generator's paraphrase machinery. Continuous parameters (gains,
strengths, crop and placement jitter) are drawn per image inside the training ranges and kept in `meta`.

With `--bases lighting,palette,style`, a pair of two different subjects that shares one of those factors also gets
a base image per side (`meta["base_x"]`, `meta["base_y"]`): that side's content, placement and crop with the shared
factors changed (half of the time to a user photo's plain value: neutral light, natural colours, a photo). Base,
reference and target are the triplet apply-to-my-image is trained on: start from the base, end at the target,
steered by the other side. The pair's own images and record fields are the same with or without bases.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from training.data import transforms
from training.data.pairs import PairRecord
from training.data.procedural import (
    FACTORS,
    LAYOUTS,
    describe_layout,
    describe_pose,
    encode_png,
    name_attributes,
    pair_rng,
    place_layer,
    write_dataset,
)
from training.data.splits import TRAIN_SOURCES, split_of

SOURCE = "realpairs"
GENERATOR_VERSION = 1

MODES = ("composite", "photo", "exemplar")
EXEMPLAR_KINDS = ("painting", "illustration", "pattern")
FILTERS = ("oil", "watercolor", "pencil", "cartoon", "halftone", "pixel-art")
STYLE_OPENINGS = {
    "photo": "A photo of",
    "oil": "An oil painting of",
    "watercolor": "A watercolor painting of",
    "pencil": "A pencil sketch of",
    "cartoon": "A cartoon of",
    "halftone": "A halftone print of",
    "pixel-art": "Pixel art of",
    "painting": "A painting:",
    "illustration": "An illustration of",
    "pattern": "A pattern:",
}
# Filters that hide a factor: pencil is grey line work, so neither palette nor lighting survives it.
HIDDEN_BY = {"pencil": ("palette", "lighting")}

EXPOSURES = ("dark", "normal", "bright")
LIGHT_DIRECTIONS = ("none", *transforms.DIRECTIONS)
TEMPERATURES = ("neutral", "warm", "cool")
CONTRASTS = ("normal", "hard", "soft")
CONDITIONS = ("none", "golden-hour-left", "golden-hour-right", "night", "fog", "backlight")
LIGHTING_PARTS = ("exposure", "direction", "temperature", "contrast", "condition")
NEUTRAL_LIGHT = "normal/none/neutral/normal/none"
# A condition fixes the other parts: what it does to exposure, direction, temperature and contrast.
CONDITION_PARTS = {
    "golden-hour-left": ("normal", "left", "warm", "normal"),
    "golden-hour-right": ("normal", "right", "warm", "normal"),
    "night": ("dark", "none", "cool", "hard"),
    "fog": ("normal", "none", "neutral", "soft"),
    "backlight": ("normal", "back", "neutral", "hard"),
}
POSES = ("rot000", "rot000-mirrored")
NATURAL = "natural:"
# The value a user's own photo usually has: a base image takes it half of the time (otherwise another value).
BASE_FACTORS = {"lighting": NEUTRAL_LIGHT, "palette": "natural", "style": "photo"}


@dataclass(frozen=True)
class RealFactor:
    """A recorded factor: its paraphrases (the procedural generator's where the name is shared) and caption words."""

    name: str
    paraphrases: tuple[str, ...]


FACTOR_NAMES = ("identity", "background", "layout", "pose", "material", "palette", "lighting", "style")
PALETTE_PARAPHRASES = (
    "color palette",
    "colour palette",
    "colour scheme",
    "color scheme",
    "overall colours",
    "color grading",
    "dominant colors of the image",
    "tones of the picture",
)
# An untransformed image's lighting or palette is recorded as natural:<content>: equal for two images of the same
# content, but two different photos' natural light may or may not match, so a supervised loss must not read two
# different natural values as a known difference (factor_label).
UNKNOWN_WHEN_NATURAL = frozenset({"lighting", "palette"})


def factor_label(name: str, value: str) -> str | None:
    """The value a supervised factor loss may compare, or None where the recorded value does not say."""
    return None if name in UNKNOWN_WHEN_NATURAL and value.startswith(NATURAL) else value


REAL_FACTORS: dict[str, RealFactor] = {
    name: RealFactor(name, PALETTE_PARAPHRASES if name == "palette" else FACTORS[name].paraphrases)
    for name in FACTOR_NAMES
}


def factor_parts(name: str, value: str) -> dict[str, str]:
    """The parts of a composite factor's value (empty for the others and for natural values): lighting -> exposure,
    direction, temperature, contrast, condition; layout -> scale, position; pose -> mirrored."""
    if name == "lighting" and not value.startswith(NATURAL):
        return dict(zip(LIGHTING_PARTS, value.split("/"), strict=True))
    if name == "layout":
        return dict(zip(("scale", "position"), LAYOUTS[value], strict=True))
    if name == "pose":
        return {"mirrored": "yes" if value.endswith("-mirrored") else "no"}
    return {}


# ---------------------------------------------------------------------------------------------------------
# The real images


@dataclass(frozen=True)
class Item:
    """One manifest image the generator may use: its id, kind, absolute file, alpha flag and caption noun."""

    id: str
    kind: str
    file: str
    alpha: bool
    noun: str


@dataclass(frozen=True)
class Library:
    """The training images by role: backgrounds, cut-out subjects, style exemplars by kind, surface patterns."""

    photos: tuple[Item, ...]
    cutouts: tuple[Item, ...]
    exemplars: Mapping[str, tuple[Item, ...]]  # painting / illustration / pattern -> items
    patterns: tuple[Item, ...]
    by_id: Mapping[str, Item] = field(repr=False)


def _noun(path: str) -> str:
    """Caption words from a file name: 'People/calvrett-thinking.gif' -> 'calvrett thinking', 'fish5' -> 'fish'."""
    stem = Path(path.split("!")[-1]).stem
    words = re.sub(r"[_\-.]+|(?<=[a-z])(?=[A-Z])", " ", stem)
    words = re.sub(r"\d+", " ", words).strip().lower()
    return " ".join(words.split()) or "image"


def load_library(manifest: str | Path) -> Library:
    """The TRAIN_SOURCES rows of a realdata manifest, sorted by id; a source without a split is an error."""
    manifest = Path(manifest)
    root = manifest.parent
    items: list[Item] = []
    with manifest.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            row = json.loads(line)
            if split_of(row["source"]) != "train" or row["source"] not in TRAIN_SOURCES:
                continue
            items.append(Item(row["id"], row["kind"], str(root / row["file"]), bool(row["alpha"]), _noun(row["path"])))
    items.sort(key=lambda item: item.id)
    library = Library(
        photos=tuple(item for item in items if item.kind == "photo"),
        cutouts=tuple(item for item in items if item.kind == "cutout" and item.alpha),
        exemplars={kind: tuple(item for item in items if item.kind == kind) for kind in EXEMPLAR_KINDS},
        patterns=tuple(item for item in items if item.kind == "pattern"),
        by_id={item.id: item for item in items},
    )
    if not library.photos or not library.cutouts or not any(library.exemplars.values()):
        raise ValueError(
            f"{manifest} has too few training images (photos {len(library.photos)}, cut-outs "
            f"{len(library.cutouts)}, exemplars {sum(map(len, library.exemplars.values()))}); build it with "
            "`python -m training.data.realdata build` from the TRAIN_SOURCES packages"
        )
    return library


@functools.lru_cache(maxsize=8)
def _library(manifest: str) -> Library:
    return load_library(manifest)


@functools.lru_cache(maxsize=1024)
def _square(file: str, side: int) -> np.ndarray:
    """The centred square crop of an opaque image resized to (side, side, 3), uint8 (cached per process)."""
    with Image.open(file) as image:
        image = image.convert("RGB")
    crop = min(image.size)
    left, top = (image.size[0] - crop) // 2, (image.size[1] - crop) // 2
    image = image.resize((side, side), Image.Resampling.BILINEAR, box=(left, top, left + crop, top + crop))
    return np.asarray(image)


@functools.lru_cache(maxsize=512)
def _cutout(file: str, side: int) -> Image.Image:
    """An alpha image cropped to its opaque box, its longer side at most `side` (RGBA, cached per process)."""
    with Image.open(file) as image:
        image = image.convert("RGBA")
    image = image.crop(image.getchannel("A").getbbox())
    if max(image.size) > side:
        fit = side / max(image.size)
        image = image.resize((max(1, round(image.size[0] * fit)), max(1, round(image.size[1] * fit))), Image.LANCZOS)
    return image


@functools.lru_cache(maxsize=128)
def _swatch(file: str) -> np.ndarray:
    """A pattern at its own scale, float (h, w, 3): tiled, never resized, so its grain stays that of the file."""
    with Image.open(file) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


# ---------------------------------------------------------------------------------------------------------
# Image specifications


@dataclass(frozen=True)
class ImageSpec:
    """What one image shows: its scene mode, the manifest items in it and the transforms applied."""

    mode: str  # composite | photo | exemplar
    identity: str  # manifest id of the subject, photo or exemplar
    background: str | None = None  # manifest id of the background photo (composite), None otherwise
    layout: str | None = None  # LAYOUTS value of a placed subject
    pose: str | None = None  # POSES value of a placed subject
    material: str | None = None  # manifest id of a pattern re-surfacing the subject
    palette: str = "natural"  # a transforms.PALETTES name or "natural"
    lighting: str = NEUTRAL_LIGHT
    style: str = "photo"  # a filter, "photo", or the exemplar's kind


def _content_key(spec: ImageSpec) -> str:
    return "+".join(part for part in (spec.identity, spec.background, spec.material) if part)


def recorded_factors(spec: ImageSpec, library: Library) -> dict[str, str]:
    """The factor values an image shows (see the module docstring); hidden or absent factors are left out."""
    kind = library.by_id[spec.identity].kind
    values = {"identity": f"{kind}:{spec.identity}", "style": spec.style}
    if spec.mode == "composite":
        values["background"] = f"photo:{spec.background}"
    elif spec.mode == "photo":
        values["background"] = f"photo:{spec.identity}"
    elif spec.layout is not None:
        values["background"] = "plain"
    if spec.layout is not None:
        values["layout"] = spec.layout
        values["pose"] = spec.pose
    if spec.material is not None:
        values["material"] = f"pattern:{spec.material}"
    elif spec.mode == "composite":
        values["material"] = NATURAL + spec.identity  # the cut-out's own surface
    content = _content_key(spec)
    values["palette"] = spec.palette if spec.palette != "natural" else NATURAL + content
    values["lighting"] = spec.lighting if spec.lighting != NEUTRAL_LIGHT else NATURAL + content
    for hidden in HIDDEN_BY.get(spec.style, ()):
        values.pop(hidden, None)
    return {name: values[name] for name in FACTOR_NAMES if name in values}


# ---------------------------------------------------------------------------------------------------------
# Sampling


DEFAULT_CHANGE_WEIGHTS = {
    "identity": 1.0,
    "background": 1.0,
    "layout": 0.8,
    "pose": 0.4,
    "material": 0.8,
    "palette": 1.0,
    "lighting": 2.0,
    "style": 1.5,
}


@dataclass(frozen=True)
class RealPairsConfig:
    """The mix: scene modes, how often each transform is applied, and how often each factor is the one changed."""

    size: int = 224
    mode_weights: Mapping[str, float] = field(
        default_factory=lambda: {"composite": 0.45, "photo": 0.3, "exemplar": 0.25}
    )
    change_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_CHANGE_WEIGHTS))
    max_changed: int = 2  # factors re-drawn for y (their dependents come on top)
    palette_share: float = 0.4  # images recoloured with a named palette
    relit_share: float = 0.85  # images whose lighting is changed (the rest keep the photo's own light)
    condition_share: float = 0.35  # of the relit ones: golden hour, night, fog or backlight
    filter_share: float = 0.35  # photo-mode and composite images passed through an art-style filter
    material_share: float = 0.3  # composite subjects re-surfaced with a pattern
    # Factors for which a transfer pair (two subjects sharing one of them) also gets a base image per side: the
    # same content, placement and crop with those shared factors changed (apply-to-my-image training triplets).
    base_factors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.size < 32:
            raise ValueError(f"size must be at least 32 pixels, got {self.size}")
        unknown = sorted(set(self.change_weights) - set(FACTOR_NAMES))
        if unknown:
            raise ValueError(
                f"unknown factor(s) in the weights: {', '.join(unknown)}; known: {', '.join(FACTOR_NAMES)}"
            )
        if not any(weight > 0 for weight in self.change_weights.values()):
            raise ValueError("every change weight is 0, so no pair could differ; give one factor a weight above 0")
        if sorted(self.mode_weights) != sorted(MODES) or not any(w > 0 for w in self.mode_weights.values()):
            raise ValueError(f"mode weights need exactly the modes {', '.join(MODES)} with one above 0")
        if self.max_changed < 1:
            raise ValueError(f"max_changed must be at least 1, got {self.max_changed}")
        unknown = sorted(set(self.base_factors) - set(BASE_FACTORS))
        if unknown:
            raise ValueError(f"base factor(s) {', '.join(unknown)} unsupported; choose from {', '.join(BASE_FACTORS)}")


def _pick(rng: np.random.Generator, options: Sequence, weights: Sequence[float] | None = None):
    if weights is None:
        return options[int(rng.integers(len(options)))]
    weights = np.asarray(weights, dtype=np.float64)
    return options[int(rng.choice(len(options), p=weights / weights.sum()))]


def _other(rng: np.random.Generator, options: Sequence, current) -> object:
    others = [option for option in options if option != current]
    return _pick(rng, others) if others else current


def _lighting(rng: np.random.Generator, config: RealPairsConfig) -> str:
    if rng.random() >= config.relit_share:
        return NEUTRAL_LIGHT
    if rng.random() < config.condition_share:
        condition = _pick(rng, CONDITIONS[1:])
        return "/".join((*CONDITION_PARTS[condition], condition))
    while True:
        parts = (_pick(rng, EXPOSURES), _pick(rng, LIGHT_DIRECTIONS), _pick(rng, TEMPERATURES), _pick(rng, CONTRASTS))
        value = "/".join((*parts, "none"))
        if value != NEUTRAL_LIGHT:
            return value


def _placed(rng: np.random.Generator) -> tuple[str, str]:
    return _pick(rng, tuple(LAYOUTS)), _pick(rng, POSES)


def _exemplar(rng: np.random.Generator, library: Library, kind: str) -> ImageSpec:
    item = _pick(rng, library.exemplars[kind])
    layout, pose = _placed(rng) if item.alpha else (None, None)
    return ImageSpec(mode="exemplar", identity=item.id, layout=layout, pose=pose, style=kind)


def _scene_style(rng: np.random.Generator, config: RealPairsConfig) -> str:
    return _pick(rng, FILTERS) if rng.random() < config.filter_share else "photo"


def sample_image(rng: np.random.Generator, library: Library, config: RealPairsConfig) -> ImageSpec:
    """One image specification drawn with the config's mix."""
    mode = _pick(rng, MODES, [config.mode_weights[mode] for mode in MODES])
    if mode == "exemplar":
        kinds = [kind for kind in EXEMPLAR_KINDS if library.exemplars[kind]]
        spec = _exemplar(rng, library, _pick(rng, kinds))
    elif mode == "photo":
        spec = ImageSpec(mode="photo", identity=_pick(rng, library.photos).id, style=_scene_style(rng, config))
    else:
        layout, pose = _placed(rng)
        material = None
        if library.patterns and rng.random() < config.material_share:
            material = _pick(rng, library.patterns).id
        spec = ImageSpec(
            mode="composite",
            identity=_pick(rng, library.cutouts).id,
            background=_pick(rng, library.photos).id,
            layout=layout,
            pose=pose,
            material=material,
            style=_scene_style(rng, config),
        )
    palette = _pick(rng, tuple(transforms.PALETTES)) if rng.random() < config.palette_share else "natural"
    return replace(spec, palette=palette, lighting=_lighting(rng, config))


def change_image(
    spec: ImageSpec, name: str, rng: np.random.Generator, library: Library, config: RealPairsConfig
) -> ImageSpec:
    """A copy of spec with factor `name` set to another value (what must change with it changes too)."""
    if name == "identity":
        if spec.mode == "composite":
            return replace(spec, identity=_other(rng, [item.id for item in library.cutouts], spec.identity))
        if spec.mode == "photo":
            return replace(spec, identity=_other(rng, [item.id for item in library.photos], spec.identity))
        other = _other(rng, [item.id for item in library.exemplars[spec.style]], spec.identity)
        layout, pose = spec.layout, spec.pose  # an illustration with alpha keeps the placement it had
        if not library.by_id[other].alpha:
            layout, pose = None, None
        elif layout is None:
            layout, pose = _placed(rng)
        return replace(spec, identity=other, layout=layout, pose=pose)
    if name == "background":
        if spec.mode == "composite":
            return replace(spec, background=_other(rng, [item.id for item in library.photos], spec.background))
        if spec.mode == "photo":  # the photo is the background: another photo
            return replace(spec, identity=_other(rng, [item.id for item in library.photos], spec.identity))
        return spec
    if name == "layout":
        return replace(spec, layout=_other(rng, tuple(LAYOUTS), spec.layout)) if spec.layout else spec
    if name == "pose":
        return replace(spec, pose=_other(rng, POSES, spec.pose)) if spec.pose else spec
    if name == "material":
        if spec.mode != "composite" or not library.patterns:
            return spec
        return replace(spec, material=_other(rng, [None, *(item.id for item in library.patterns)], spec.material))
    if name == "palette":
        return replace(spec, palette=_other(rng, ("natural", *transforms.PALETTES), spec.palette))
    if name == "lighting":
        for _attempt in range(100):
            lighting = _lighting(rng, config)
            if lighting != spec.lighting:
                return replace(spec, lighting=lighting)
        return spec
    if name == "style":
        if spec.mode != "exemplar":
            return replace(spec, style=_other(rng, ("photo", *FILTERS), spec.style))
        kinds = [kind for kind in EXEMPLAR_KINDS if library.exemplars[kind] and kind != spec.style]
        changed = _exemplar(rng, library, _pick(rng, kinds)) if kinds else spec
        return replace(changed, palette=spec.palette, lighting=spec.lighting)
    raise ValueError(f"unknown factor {name!r}; known: {', '.join(FACTOR_NAMES)}")


def base_image(
    spec: ImageSpec, names: Sequence[str], rng: np.random.Generator, library: Library, config: RealPairsConfig
) -> ImageSpec | None:
    """spec with each factor in `names` set to another value, all else kept: the photo a user would start from
    to give it the reference's value. None when a factor cannot change alone (an exemplar's style is its identity)."""
    base = spec
    for name in names:
        if name == "style" and spec.mode == "exemplar":
            return None
        natural = BASE_FACTORS[name]
        if getattr(base, name) != natural and rng.random() < 0.5:
            base = replace(base, **{name: natural})
        else:
            base = change_image(base, name, rng, library, config)
    before, after = recorded_factors(spec, library), recorded_factors(base, library)
    if any(name in before and before.get(name) == after.get(name) for name in names):
        return None
    return base


@dataclass(frozen=True)
class RealPairSpec:
    """A sampled pair before rendering: both image specs, their recorded factors and the named attributes."""

    x: ImageSpec
    y: ImageSpec
    factors_x: dict[str, str]
    factors_y: dict[str, str]
    positive: tuple[tuple[str, str], ...]
    negative: tuple[tuple[str, str], ...]
    jitter_x: int
    jitter_y: int


def _nameable_difference(name: str, value_x: str, value_y: str) -> bool:
    # Two untransformed images of different content do differ in palette and light, but by how much is not
    # known (two daylight photos may look alike): only a controlled difference is named as a negative.
    return value_x != value_y and not (value_x.startswith(NATURAL) and value_y.startswith(NATURAL))


def sample_pair(rng: np.random.Generator, library: Library, config: RealPairsConfig) -> RealPairSpec:
    """Draw x, change a weighted choice of its factors for y, and name the shared and differing factors."""
    names = [name for name in FACTOR_NAMES if config.change_weights.get(name, 0) > 0]
    weights = np.array([config.change_weights[name] for name in names], dtype=np.float64)
    for _attempt in range(1000):
        x = sample_image(rng, library, config)
        count = int(rng.integers(1, min(config.max_changed, len(names)) + 1))
        to_change = rng.choice(len(names), size=count, replace=False, p=weights / weights.sum())
        y = x
        for index in sorted(int(i) for i in to_change):
            y = change_image(y, names[index], rng, library, config)
        factors_x, factors_y = recorded_factors(x, library), recorded_factors(y, library)
        both = [name for name in FACTOR_NAMES if name in factors_x and name in factors_y]
        shared = [name for name in both if factors_x[name] == factors_y[name]]
        differing = [name for name in both if _nameable_difference(name, factors_x[name], factors_y[name])]
        if shared and differing:
            break
    else:
        raise ValueError("could not draw a pair with a shared and a differing factor in 1000 tries; check the weights")
    positive, negative = name_attributes(rng, shared, differing, REAL_FACTORS)
    jitters = rng.integers(0, 2**31 - 1, size=2)
    return RealPairSpec(x, y, factors_x, factors_y, positive, negative, int(jitters[0]), int(jitters[1]))


# ---------------------------------------------------------------------------------------------------------
# Rendering


def _uniform(jitter: np.random.Generator, name: str) -> float:
    low, high = transforms.RANGES[name]
    return float(jitter.uniform(low, high))


def _relight(
    image: np.ndarray, alpha: np.ndarray | None, lighting: str, jitter: np.random.Generator, params: dict
) -> np.ndarray:
    """Apply a lighting value's parts in a fixed order: condition or exposure, direction, temperature, contrast."""
    exposure_part, direction, temperature, contrast, condition = lighting.split("/")
    if condition.startswith("golden-hour"):
        params["warmth"], params["strength"] = _uniform(jitter, "golden_warmth"), _uniform(jitter, "golden_strength")
        side = condition.rsplit("-", 1)[1]
        image = transforms.golden_hour(image, side, params["warmth"], params["strength"])
        if alpha is not None:
            image = transforms.shade_subject(image, alpha, side, params["strength"])
        return image
    if condition == "night":
        params["gain"] = _uniform(jitter, "night_gain")
        return transforms.night(image, params["gain"])
    if condition == "fog":
        params["fog"] = _uniform(jitter, "fog")
        return transforms.fog(image, params["fog"])
    if condition == "backlight":
        params["backlight"] = _uniform(jitter, "backlight")
        return transforms.backlight(image, alpha, params["backlight"])
    if exposure_part != "normal":
        params["gain"] = _uniform(jitter, f"exposure_{exposure_part}")
        image = transforms.exposure(image, params["gain"])
    if direction != "none":
        params["direction_strength"] = _uniform(jitter, "direction_strength")
        image = transforms.direction_light(image, direction, params["direction_strength"])
        if alpha is not None:
            image = transforms.shade_subject(image, alpha, direction, params["direction_strength"])
    if temperature != "neutral":
        params["temperature"] = _uniform(jitter, "temperature")
        image = transforms.white_balance(image, params["temperature"] * (1 if temperature == "warm" else -1))
    if contrast != "normal":
        params["contrast"] = _uniform(jitter, "contrast")
        image = transforms.contrast_curve(image, params["contrast"] * (1 if contrast == "hard" else -1))
    return image


def _stylise(image: np.ndarray, style: str, jitter: np.random.Generator, params: dict) -> np.ndarray:
    if style == "oil":
        params["radius"] = int(jitter.integers(3, 7))
        return transforms.oil_paint(image, params["radius"])
    if style == "watercolor":
        params["paper_seed"] = int(jitter.integers(0, 2**16))
        return transforms.watercolor(image, params["paper_seed"])
    if style == "pencil":
        params["blur"] = float(jitter.uniform(2.0, 4.0))
        return transforms.pencil(image, params["blur"])
    if style == "cartoon":
        params["levels"] = int(jitter.integers(4, 7))
        return transforms.cartoon(image, params["levels"])
    if style == "halftone":
        params["cell"] = int(jitter.integers(4, 8))
        return transforms.halftone(image, params["cell"])
    if style == "pixel-art":
        params["block"], params["colors"] = int(jitter.integers(4, 9)), int(jitter.integers(8, 17))
        return transforms.pixel_art(image, params["block"], params["colors"])
    return image


def _crop(array: np.ndarray, size: int, margin: int, jitter: np.random.Generator) -> np.ndarray:
    top, left = jitter.integers(0, 2 * margin + 1, size=2)
    return array[top : top + size, left : left + size]


def render_image(
    spec: ImageSpec, library: Library, size: int, jitter_seed: int
) -> tuple[np.ndarray, dict[str, float | int]]:
    """Render one image (size, size, 3) float in [0, 1] and the continuous parameters drawn for it."""
    jitter = np.random.default_rng(jitter_seed)
    margin = max(1, size // 16)
    params: dict[str, float | int] = {}
    alpha = None
    item = library.by_id[spec.identity]
    if spec.mode == "photo" or (spec.mode == "exemplar" and not item.alpha):
        if item.kind == "pattern":
            image = transforms.tile(_swatch(item.file), size, size)
        else:
            image = _crop(_square(item.file, size + 2 * margin).astype(np.float32) / 255.0, size, margin, jitter)
    else:
        if spec.mode == "composite":
            backdrop = _square(library.by_id[spec.background].file, size + 2 * margin).astype(np.float32) / 255.0
            backdrop = _crop(backdrop, size, margin, jitter)
        else:  # an illustration on plain, slightly warm paper
            backdrop = np.full((size, size, 3), (0.97, 0.96, 0.93), np.float32)
        layer = _cutout(item.file, size)
        if spec.pose == "rot000-mirrored":
            layer = ImageOps.mirror(layer)
        subject, alpha = place_layer(layer, spec.layout, size, jitter)  # (size, size, 3), (size, size)
        if spec.material is not None:
            params["material_strength"] = float(jitter.uniform(0.55, 0.75))
            texture = transforms.tile(_swatch(library.by_id[spec.material].file), size, size)
            subject = transforms.apply_texture(subject, alpha, texture, params["material_strength"])
        image = subject * alpha[:, :, None] + backdrop * (1.0 - alpha[:, :, None])
    if spec.palette != "natural":
        image = transforms.recolor(image, spec.palette)
    if spec.lighting != NEUTRAL_LIGHT:
        image = _relight(image, alpha, spec.lighting, jitter, params)
    image = _stylise(np.clip(image, 0.0, 1.0).astype(np.float32), spec.style, jitter, params)
    return np.clip(image, 0.0, 1.0).astype(np.float32), params


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8))


def describe_lighting(value: str) -> str:
    """Caption words for a lighting value."""
    if value.startswith(NATURAL):
        return "in its own light"
    exposure_part, direction, temperature, contrast, condition = value.split("/")
    if condition.startswith("golden-hour"):
        return f"in golden-hour light from the {condition.rsplit('-', 1)[1]}"
    if condition in ("night", "fog"):
        return {"night": "at night, in low-key light", "fog": "in fog and haze"}[condition]
    if condition == "backlight":
        return "backlit against a bright glow"
    words = []
    if exposure_part != "normal":
        words.append({"dark": "underexposed", "bright": "overexposed"}[exposure_part])
    if direction != "none":
        words.append(f"lit from the {direction.replace('-', ' ')}")
    if temperature != "neutral":
        words.append(f"in {temperature} light")
    if contrast != "normal":
        words.append(f"with {contrast} contrast")
    return ", ".join(words)


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def caption_for(spec: ImageSpec, library: Library) -> str:
    """A caption describing an image from its specification."""
    subject = library.by_id[spec.identity].noun
    text = f"{STYLE_OPENINGS[spec.style]} {subject}"
    if spec.mode == "composite":
        text += f" in front of {_a(library.by_id[spec.background].noun)}"
        if spec.material is not None:
            text += f", made of {library.by_id[spec.material].noun}"
    if spec.layout is not None:
        text += f", {describe_layout(spec.layout)}, {describe_pose(spec.pose)}"
    if spec.palette != "natural":
        text += f", in {_a(spec.palette)} palette"
    if spec.lighting != NEUTRAL_LIGHT:
        text += f", {describe_lighting(spec.lighting)}"
    return text + "."


def render_pair(out: Path, manifest: str, seed: int, index: int, config: RealPairsConfig) -> PairRecord:
    """Draw pair `index` of run `seed`, write its two PNGs under `out`, and return its record."""
    library = _library(manifest)
    spec = sample_pair(pair_rng(seed, index), library, config)
    paths, params = [], []
    for side, image_spec, jitter in (("x", spec.x, spec.jitter_x), ("y", spec.y, spec.jitter_y)):
        image, drawn = render_image(image_spec, library, config.size, jitter)
        relative = f"images/{index // 1000:04d}/{index:07d}_{side}.png"
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(encode_png(_to_pil(image)))
        paths.append(relative)
        params.append({key: round(value, 4) if isinstance(value, float) else value for key, value in drawn.items()})
    meta = {}
    shared = [name for _, name in spec.positive if name in config.base_factors]
    if shared and spec.factors_x.get("identity") != spec.factors_y.get("identity"):
        rng = np.random.default_rng([seed, index, 1])  # apart from the pair's own draws: x and y stay the same
        for side, image_spec, jitter in (("x", spec.x, spec.jitter_x), ("y", spec.y, spec.jitter_y)):
            base = base_image(image_spec, shared, rng, library, config)
            if base is None:
                continue
            image, _ = render_image(base, library, config.size, jitter)  # same jitter: same crop and placement
            relative = f"images/{index // 1000:04d}/{index:07d}_{side}_base.png"
            (out / relative).write_bytes(encode_png(_to_pil(image)))
            meta[f"base_{side}"] = relative
            meta[f"base_factors_{side}"] = recorded_factors(base, library)
    return PairRecord(
        image_x=paths[0],
        image_y=paths[1],
        caption_x=caption_for(spec.x, library),
        caption_y=caption_for(spec.y, library),
        positive=tuple(phrase for phrase, _ in spec.positive),
        negative=tuple(phrase for phrase, _ in spec.negative),
        id=f"real-{seed}-{index}",
        source=SOURCE,
        factors_x=spec.factors_x,
        factors_y=spec.factors_y,
        positive_factors=tuple(name for _, name in spec.positive),
        negative_factors=tuple(name for _, name in spec.negative),
        meta={
            "generator_version": GENERATOR_VERSION,
            "size": config.size,
            "mode_x": spec.x.mode,
            "mode_y": spec.y.mode,
            "manifest_ids_x": _manifest_ids(spec.x),
            "manifest_ids_y": _manifest_ids(spec.y),
            "jitter_x": spec.jitter_x,
            "jitter_y": spec.jitter_y,
            "params_x": params[0],
            "params_y": params[1],
            **meta,
        },
    )


def _manifest_ids(spec: ImageSpec) -> list[str]:
    return [item for item in (spec.identity, spec.background, spec.material) if item]


def generate_dataset(
    manifest: str | Path,
    out: str | Path,
    num_pairs: int,
    seed: int,
    config: RealPairsConfig = RealPairsConfig(),
    *,
    workers: int = 1,
) -> int:
    """Write num_pairs real-content pairs (images + pairs.jsonl) into a new or empty directory; returns the count.

    The bytes written are the same for any number of workers.
    """
    manifest = str(Path(manifest).resolve())
    load_library(manifest)  # fail early, in this process, on a manifest without training images
    render = functools.partial(render_pair, Path(out), manifest, seed, config=config)
    return write_dataset(Path(out), num_pairs, render, workers=workers)


# ---------------------------------------------------------------------------------------------------------
# Command line


def parse_weights(texts: Sequence[str]) -> dict[str, float]:
    """--weights arguments "factor=weight,factor=weight" as change weights over the defaults."""
    weights = dict(DEFAULT_CHANGE_WEIGHTS)
    for text in texts:
        for part in text.split(","):
            name, separator, value = part.partition("=")
            try:
                weights[name.strip()] = float(value)
            except ValueError:
                separator = ""
            if not separator:
                raise ValueError(f"--weights {text!r}: write factor=weight pairs separated by commas, e.g. lighting=2")
    return weights


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: write a real-content pair dataset and print a one-line JSON summary."""
    parser = argparse.ArgumentParser(prog="python -m training.data.realpairs", description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True, type=Path, help="manifest.jsonl of a realdata build")
    parser.add_argument("--out", required=True, type=Path, help="new or empty directory for pairs.jsonl and images")
    parser.add_argument("--pairs", required=True, type=int, help="number of pairs to write")
    parser.add_argument("--seed", required=True, type=int, help="run seed; the same seed gives the same bytes")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--workers", type=int, default=1, help="render in this many processes (same output)")
    parser.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="FACTOR=WEIGHT[,...]",
        help=f"how often each factor is the one changed (defaults: {DEFAULT_CHANGE_WEIGHTS})",
    )
    parser.add_argument("--max-changed", type=int, default=2, help="most factors re-drawn for image y (default 2)")
    parser.add_argument(
        "--bases",
        default="",
        metavar="FACTOR[,...]",
        help="for pairs of two subjects sharing one of these factors (lighting, palette, style), also write each "
        "side's base image: the same content with the shared factors changed (apply-to-my-image training)",
    )
    args = parser.parse_args(argv)
    try:
        config = RealPairsConfig(
            size=args.size,
            change_weights=parse_weights(args.weights),
            max_changed=args.max_changed,
            base_factors=tuple(name.strip() for name in args.bases.split(",") if name.strip()),
        )
        started = time.perf_counter()
        count = generate_dataset(args.manifest, args.out, args.pairs, args.seed, config, workers=args.workers)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    summary = {
        "out": str(args.out),
        "pairs": count,
        "seconds": round(seconds, 2),
        "pairs_per_second": round(count / seconds, 2),
        "images_per_second": round(2 * count / seconds, 2),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
