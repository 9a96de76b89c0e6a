"""The real-content pair generator and its transforms, on a tiny manifest of generated images built in the test."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import transforms
from training.data.pairs import load_pairs
from training.data.procedural import pair_rng
from training.data.realpairs import (
    FACTOR_NAMES,
    FILTERS,
    NEUTRAL_LIGHT,
    REAL_FACTORS,
    ImageSpec,
    RealPairsConfig,
    factor_label,
    factor_parts,
    generate_dataset,
    load_library,
    main,
    parse_weights,
    recorded_factors,
    render_image,
    sample_pair,
)
from training.data.splits import HELDOUT_SOURCES, TRAIN_SOURCES

SIZE = 64
HELD_OUT_ID = "feedfacefeedface"


def _photo(seed: int, width: int = 120, height: int = 90) -> Image.Image:
    """A photo-like image: a smooth colour field with a few bright and dark blobs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([0.3 + 0.5 * x, 0.4 + 0.3 * y, 0.6 - 0.4 * x * y], axis=2) * rng.uniform(0.7, 1.1, 3)
    for _ in range(4):
        cy, cx, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.2)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / radius**2)[:, :, None]
        base = base * (1 - blob) + blob * rng.uniform(0, 1, 3)
    return Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8))


def _cutout() -> Image.Image:
    """An oval, yellow on top, red below, with a blue left edge, in a transparent surround (RGBA)."""
    y, x = np.mgrid[0:80, 0:60]
    inside = ((x - 30) / 26) ** 2 + ((y - 40) / 36) ** 2 < 1
    rgba = np.zeros((80, 60, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = np.where(x < 20, 30, 220), np.where(y < 40, 200, 40), (x < 20) * 220
    rgba[..., 3] = inside * 255
    return Image.fromarray(rgba, "RGBA")


def _pattern() -> Image.Image:
    tile = np.zeros((16, 16, 3), np.uint8)
    tile[:, :] = (150, 100, 50)
    tile[::4] = (90, 60, 30)  # wood-like stripes
    return Image.fromarray(tile)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """A manifest: three photos, a cut-out with alpha, a painting, an illustration, a pattern, a held-out photo."""
    root = tmp_path_factory.mktemp("realdata")
    (root / "images").mkdir()
    rows = []

    def add(image_id: str, source: str, kind: str, image: Image.Image, path: str) -> None:
        suffix = "png" if image.mode == "RGBA" or kind == "pattern" else "jpg"
        file = f"images/{image_id}.{suffix}"
        image.save(root / file)
        rows.append({"id": image_id, "source": source, "kind": kind, "file": file, "alpha": image.mode == "RGBA",
                     "path": path, "width": image.size[0], "height": image.size[1]})  # fmt: skip

    for number in range(3):
        add(f"a{number:015x}", "scratch", "photo", _photo(number), f"Backgrounds/scene{number}.jpg")
    add("b000000000000001", "scratch", "cutout", _cutout(), "Costumes/People/disc-person.gif")
    add("c000000000000001", "gcompris-qt-data", "painting", _photo(7, 100, 100), "paintings/board1_0.qml")
    add("d000000000000001", "openclipart-png", "illustration", _cutout().rotate(90, expand=True), "png/food/egg.png")
    add("e000000000000001", "gimp-data", "pattern", _pattern(), "patterns/Wood/wood1.pat")
    add(HELD_OUT_ID, "opencv-doc", "photo", _photo(9), "usr/share/doc/opencv-doc/examples/data/baboon.jpg")
    assert {row["source"] for row in rows} - {"opencv-doc"} <= TRAIN_SOURCES and "opencv-doc" in HELDOUT_SOURCES
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()
    }


def test_same_seed_same_bytes_with_one_or_two_workers(manifest, tmp_path):
    config = RealPairsConfig(size=SIZE)
    generate_dataset(manifest, tmp_path / "a", 10, seed=5, config=config)
    generate_dataset(manifest, tmp_path / "b", 10, seed=5, config=config)
    generate_dataset(manifest, tmp_path / "c", 10, seed=5, config=config, workers=2)
    generate_dataset(manifest, tmp_path / "d", 10, seed=6, config=config)

    first = _files(tmp_path / "a")
    assert len(first) == 21  # 20 images and pairs.jsonl
    assert first == _files(tmp_path / "b") == _files(tmp_path / "c")
    assert first != _files(tmp_path / "d")


def test_bases_change_only_the_shared_transfer_factors_and_leave_the_pairs_as_they_were(manifest, tmp_path):
    generate_dataset(manifest, tmp_path / "plain", 24, seed=3, config=RealPairsConfig(size=SIZE))
    config = RealPairsConfig(size=SIZE, base_factors=("lighting", "palette", "style"))
    generate_dataset(manifest, tmp_path / "bases", 24, seed=3, config=config)

    plain, bases = _files(tmp_path / "plain"), _files(tmp_path / "bases")
    assert {name: data for name, data in bases.items() if name.endswith(("_x.png", "_y.png"))} == {
        name: data for name, data in plain.items() if name.endswith(".png")
    }
    with_base = 0
    pairs = zip(load_pairs(tmp_path / "bases").records, load_pairs(tmp_path / "plain").records, strict=True)
    for record, before in pairs:
        assert replace(record, meta=before.meta) == before  # the record is the same apart from its base entries
        shared = {"lighting", "palette", "style"} & set(record.positive_factors)
        eligible = shared and record.factors_x["identity"] != record.factors_y["identity"]
        for side, factors in (("x", record.factors_x), ("y", record.factors_y)):
            if f"base_{side}" not in record.meta:
                continue
            assert eligible
            with_base += 1
            base_factors = record.meta[f"base_factors_{side}"]
            for name in set(factors) | set(base_factors):
                if name in shared:  # the reference's value is gone from the base ...
                    assert base_factors.get(name) != factors.get(name), (name, side)
                elif name not in ("palette", "lighting"):  # ... the content stays (a filter may hide these two)
                    assert base_factors.get(name) == factors.get(name), (name, side)
            base = np.asarray(Image.open(tmp_path / "bases" / record.meta[f"base_{side}"]), np.float32)
            image = np.asarray(Image.open(tmp_path / "bases" / getattr(record, f"image_{side}")), np.float32)
            assert base.shape == image.shape and np.abs(base - image).mean() > 1.0
    assert with_base >= 4


def test_bases_flag_writes_bases_and_refuses_a_factor_it_cannot_change_alone(manifest, tmp_path, capsys):
    args = ["--manifest", str(manifest), "--pairs", "12", "--seed", "3", "--size", str(SIZE)]
    assert main([*args, "--out", str(tmp_path / "bad"), "--bases", "lighting,identity"]) == 2
    assert "base factor(s) identity unsupported; choose from lighting, palette, style" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "good"), "--bases", "lighting, palette,style"]) == 0
    assert any("base_x" in record.meta for record in load_pairs(tmp_path / "good").records)


def test_pair_file_loads_clean_and_records_the_real_factors(manifest, tmp_path):
    assert main(["--manifest", str(manifest), "--out", str(tmp_path), "--pairs", "8", "--seed", "1",
                 "--size", str(SIZE)]) == 0  # fmt: skip

    report = load_pairs(tmp_path)

    assert report.bad_lines == [] and len(report.records) == 8
    for record in report.records:
        assert record.source == "realpairs"
        assert set(record.positive_factors) | set(record.negative_factors) <= set(FACTOR_NAMES)
        with Image.open(tmp_path / record.image_x) as image:
            assert image.size == (SIZE, SIZE) and image.mode == "RGB"
        for name, phrases in (("positive_factors", record.positive), ("negative_factors", record.negative)):
            for phrase, factor in zip(phrases, getattr(record, name), strict=True):
                assert phrase in REAL_FACTORS[factor].paraphrases


def test_positives_are_equal_and_negatives_differ_in_the_recorded_factors(manifest):
    library = load_library(manifest)
    config = RealPairsConfig(size=SIZE)
    named = set()
    for index in range(400):
        spec = sample_pair(pair_rng(3, index), library, config)
        assert spec.positive and spec.negative
        for _, name in spec.positive:
            assert spec.factors_x[name] == spec.factors_y[name], (name, spec)
        for _, name in spec.negative:
            assert spec.factors_x[name] != spec.factors_y[name], (name, spec)
            # never two untransformed, unrelated contents: their difference is not a controlled one
            assert not (spec.factors_x[name].startswith("natural:") and spec.factors_y[name].startswith("natural:"))
        assert spec.factors_x == recorded_factors(spec.x, library)
        named |= {name for _, name in spec.positive + spec.negative}
    assert named == set(FACTOR_NAMES)


def test_a_held_out_source_is_never_used(manifest, tmp_path):
    library = load_library(manifest)
    assert HELD_OUT_ID not in library.by_id
    for index in range(300):
        spec = sample_pair(pair_rng(8, index), library, RealPairsConfig(size=SIZE))
        assert HELD_OUT_ID not in json.dumps([spec.factors_x, spec.factors_y, spec.x, spec.y], default=str)
    generate_dataset(manifest, tmp_path, 12, seed=8, config=RealPairsConfig(size=SIZE))
    assert HELD_OUT_ID not in (tmp_path / "pairs.jsonl").read_text()


def test_a_manifest_source_without_a_split_is_refused(tmp_path):
    row = {
        "id": "x",
        "source": "some-new-package",
        "kind": "photo",
        "file": "images/x.jpg",
        "alpha": False,
        "path": "x",
    }
    (tmp_path / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="no split"):
        load_library(tmp_path / "manifest.jsonl")


def test_every_factor_change_shows_in_the_pixels(manifest):
    library = load_library(manifest)
    base = ImageSpec(
        mode="composite", identity="b000000000000001", background="a000000000000000", layout="medium-center",
        pose="rot000", palette="natural", lighting=NEUTRAL_LIGHT, style="photo",
    )  # fmt: skip
    changes = {
        "background": {"background": "a000000000000001"},
        "layout": {"layout": "small-top-left"},
        "pose": {"pose": "rot000-mirrored"},
        "material": {"material": "e000000000000001"},
        "palette": {"palette": "ocean"},
        "lighting": {"lighting": "dark/left/cool/hard/none"},
        "style": {"style": "pencil"},
    }
    image, _ = render_image(base, library, SIZE, jitter_seed=1)
    for name, change in changes.items():
        changed, _ = render_image(replace(base, **change), library, SIZE, jitter_seed=1)
        assert np.abs(changed - image).mean() > 0.01, name
    for value in FILTERS:
        filtered, _ = render_image(replace(base, style=value), library, SIZE, jitter_seed=1)
        assert np.abs(filtered - image).mean() > 0.01, value


def test_weights_are_checked_and_parsed():
    assert parse_weights(["lighting=3,style=0.5"])["lighting"] == 3.0
    with pytest.raises(ValueError, match="factor=weight"):
        parse_weights(["lighting"])
    with pytest.raises(ValueError, match="unknown factor"):
        RealPairsConfig(change_weights={"colour": 1.0})


def test_only_the_weighted_factors_change(manifest):
    library = load_library(manifest)
    config = RealPairsConfig(size=SIZE, change_weights={"lighting": 1.0}, max_changed=1)
    for index in range(100):
        spec = sample_pair(pair_rng(2, index), library, config)
        assert {name for _, name in spec.negative} == {"lighting"}


def test_lighting_parts():
    assert factor_parts("lighting", "dark/left/warm/hard/none") == {
        "exposure": "dark", "direction": "left", "temperature": "warm", "contrast": "hard", "condition": "none"
    }  # fmt: skip
    assert factor_parts("lighting", "natural:a1") == {}
    assert factor_parts("layout", "small-top-left") == {"scale": "small", "position": "top-left"}


# ---------------------------------------------------------------------------------------------------------
# Transforms: each family changes what it claims


@pytest.fixture
def photo() -> np.ndarray:
    return np.asarray(_photo(3, 96, 96), dtype=np.float32) / 255.0


def _mean_luma(image: np.ndarray) -> float:
    return float(transforms.luminance(image).mean())


def test_exposure_moves_mean_luminance_in_its_direction(photo):
    low, high = transforms.RANGES["exposure_dark"]
    assert _mean_luma(transforms.exposure(photo, high)) < _mean_luma(photo) - 0.05
    low, high = transforms.RANGES["exposure_bright"]
    assert _mean_luma(transforms.exposure(photo, low)) > _mean_luma(photo) + 0.05


SIDES = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}


@pytest.mark.parametrize("direction", list(transforms.DIRECTIONS))
def test_direction_ramp_is_brighter_on_the_named_side(direction):
    flat = np.full((64, 64, 3), 0.5, np.float32)
    lit = transforms.luminance(transforms.direction_light(flat, direction, 0.5))
    toward_x = sum(SIDES[side][0] for side in direction.split("-"))
    toward_y = sum(SIDES[side][1] for side in direction.split("-"))
    y, x = np.mgrid[0:64, 0:64] / 63.0 * 2 - 1
    along = (x * toward_x + y * toward_y) / (abs(toward_x) + abs(toward_y))  # 1 on the named side
    assert lit[along > 0.5].mean() > lit[along < -0.5].mean() + 0.15, direction


def test_shading_darkens_the_subject_side_away_from_the_light():
    image = np.full((64, 64, 3), 0.6, np.float32)
    alpha = np.zeros((64, 64), np.float32)
    alpha[16:48, 16:48] = 1.0
    shaded = transforms.luminance(transforms.shade_subject(image, alpha, "left", 0.8))
    assert shaded[20:44, 17:24].mean() > shaded[20:44, 40:47].mean() + 0.03


@pytest.mark.parametrize("warmth", [0.15, -0.15])
def test_colour_temperature_shifts_red_against_blue(photo, warmth):
    shifted = transforms.white_balance(photo, warmth)
    red_change = shifted[..., 0].mean() - photo[..., 0].mean()
    blue_change = shifted[..., 2].mean() - photo[..., 2].mean()
    assert np.sign(red_change) == np.sign(warmth) and np.sign(blue_change) == -np.sign(warmth)
    assert abs(red_change) > 0.02 and abs(blue_change) > 0.02


def test_hard_contrast_spreads_and_soft_contrast_flattens(photo):
    spread = float(photo.std())
    assert transforms.contrast_curve(photo, 0.5).std() > spread * 1.1
    assert transforms.contrast_curve(photo, -0.5).std() < spread * 0.9


def test_golden_hour_is_warm_and_brighter_towards_the_sun(photo):
    golden = transforms.golden_hour(photo, "left", 0.2, 0.6)
    assert (golden[..., 0] - golden[..., 2]).mean() > (photo[..., 0] - photo[..., 2]).mean() + 0.05
    ratio = transforms.luminance(golden) / np.maximum(transforms.luminance(photo), 0.02)
    assert ratio[:, :20].mean() > ratio[:, -20:].mean() + 0.2


def test_night_is_dark_blue_with_crushed_blacks(photo):
    dark = transforms.night(photo, 0.3)
    assert _mean_luma(dark) < _mean_luma(photo) * 0.7
    assert dark[..., 2].mean() > dark[..., 0].mean()
    grey_ramp = np.repeat(np.linspace(0.0, 1.0, 64, dtype=np.float32)[None, :, None], 3, axis=2)  # (1, 64, 3)
    assert np.all(transforms.night(grey_ramp, 0.3)[:, 1:4] == 0.0)  # the darkest tones go fully black


def test_fog_pulls_towards_light_grey_and_loses_contrast(photo):
    foggy = transforms.fog(photo, 0.45)
    assert foggy.std() < photo.std() * 0.6
    assert np.abs(foggy - 0.8).mean() < np.abs(photo - 0.8).mean()


def test_backlight_brightens_behind_and_darkens_the_subject():
    image = np.full((64, 64, 3), 0.4, np.float32)
    alpha = np.zeros((64, 64), np.float32)
    alpha[36:60, 24:40] = 1.0  # a subject standing in the lower middle
    lit = transforms.luminance(transforms.backlight(image, alpha, 0.8))
    assert lit[36:60, 24:40].mean() < 0.3  # darkened subject
    assert lit[16:30, 24:40].mean() > 0.6  # halo behind, above it
    assert lit[16:30, 24:40].mean() > lit[2:8, 2:8].mean() + 0.1  # brightest behind the centre


@pytest.mark.parametrize("name", list(transforms.PALETTES))
def test_recolor_maps_onto_the_named_palette(photo, name):
    recoloured = transforms.recolor(photo, name)
    lut = transforms.palette_lut(name)
    # every pixel lies near the palette's gradient (the 10 % of the original colour kept aside)
    distances = np.abs(recoloured.reshape(-1, 1, 3) - 0.9 * lut[None, ::8]).sum(axis=2).min(axis=1)
    assert np.median(distances) < 0.2, name


def test_filters_do_what_they_claim(photo):
    pencil = transforms.pencil(photo, 3.0)
    assert np.array_equal(pencil[..., 0], pencil[..., 1]) and np.array_equal(pencil[..., 1], pencil[..., 2])
    pixel = transforms.pixel_art(photo, 8, 8)
    assert len(np.unique(pixel.reshape(-1, 3), axis=0)) <= 8
    assert np.array_equal(pixel[0:8, 0:8], np.broadcast_to(pixel[0, 0], (8, 8, 3)))  # one colour per block
    halftone = transforms.halftone(photo, 5)
    assert np.all(np.isclose(halftone, 0.08) | np.isclose(halftone, 0.97))  # ink or paper only
    cartoon = transforms.cartoon(photo, 4)
    assert len(np.unique(cartoon.reshape(-1, 3), axis=0)) < len(np.unique(photo.reshape(-1, 3), axis=0)) / 4
    grainy = np.clip(photo + np.random.default_rng(0).normal(0, 0.05, photo.shape), 0, 1).astype(np.float32)
    oil = transforms.oil_paint(grainy, 4)  # flat strokes: the grain goes, the picture stays
    assert np.abs(np.diff(oil, axis=1)).mean() < 0.5 * np.abs(np.diff(grainy, axis=1)).mean()
    assert np.abs(oil - photo).mean() < 0.06
    watercolor = transforms.watercolor(photo, 1)
    assert _mean_luma(watercolor) > _mean_luma(photo)  # pale washes on paper
    for image in (pencil, pixel, halftone, cartoon, oil, watercolor):
        assert image.shape == photo.shape and image.dtype == np.float32
        assert image.min() >= 0.0 and image.max() <= 1.0


def test_texture_changes_only_the_subject(photo):
    alpha = np.zeros(photo.shape[:2], np.float32)
    alpha[20:60, 20:60] = 1.0
    texture = transforms.tile(np.asarray(_pattern(), np.float32) / 255.0, *photo.shape[:2])
    surfaced = transforms.apply_texture(photo, alpha, texture, 0.7)
    assert np.array_equal(surfaced[alpha == 0], photo[alpha == 0])
    assert np.abs(surfaced[alpha == 1] - photo[alpha == 1]).mean() > 0.05


def test_natural_lighting_and_palette_are_unknown_to_the_factor_loss():
    """Two different photos' own light may match or not: the factor loss must not read them as different."""
    assert factor_label("lighting", "natural:photo:a") is None and factor_label("palette", "natural:photo:a") is None
    assert factor_label("material", "natural:cutout:b") == "natural:cutout:b"  # a cut-out's own surface is known
    assert factor_label("lighting", "bright/left/warm/hard/none") == "bright/left/warm/hard/none"
