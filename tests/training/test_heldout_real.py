"""bench/heldout_real.py: held-out sources only, exact chance, transforms that do what they claim, an end-to-end run.

The benchmark script is not in a package, so it is imported by path. The manifest is synthetic (a few small
images written here under held-out and training source names); the encoder is the tiny compact one.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from encoder import AttributeEncoder
from encoder.testing import tiny_compact_config

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "heldout_real.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("heldout_real", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["heldout_real"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
SMALL = bench.Sizes(
    lighting_per_class=2, palette_per_class=2, palette_references=2, style_per_class=2, delta_pairs_per_kind=2
)


def photo_array(seed: int = 0, size: int = 64) -> np.ndarray:
    """A colourful, textured 'photo': gradients, a few discs and noise, float32 (H, W, 3) in [0, 1]."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / size
    image = np.stack([0.3 + 0.4 * xs, 0.2 + 0.5 * ys, 0.6 - 0.3 * xs * ys], axis=-1)
    for _ in range(4):
        cy, cx, radius = rng.uniform(0.1, 0.9, 3) * (1, 1, 0.3)
        disc = (ys - cy) ** 2 + (xs - cx) ** 2 < radius**2
        image[disc] = rng.uniform(0, 1, 3)
    image += rng.normal(0, 0.04, image.shape)
    return np.clip(image, 0, 1).astype(np.float32)


def _row(directory: Path, name: str, source: str, kind: str, path: str, image: Image.Image) -> dict:
    file = f"images/{name}.png"
    image.save(directory / file)
    return {"id": name, "file": file, "source": source, "kind": kind, "path": path}


def write_manifest(directory: Path) -> Path:
    """Held-out photos, constellation art of two cultures, stamps of two folders, and training-source photos."""
    (directory / "images").mkdir(parents=True)
    rows = []
    for i in range(8):
        image = Image.fromarray((photo_array(i) * 255).astype(np.uint8))
        rows.append(_row(directory, f"photo{i}", "opencv-doc", "photo", f"data/photo{i}.jpg", image))
        rows.append(_row(directory, f"train{i}", "gcompris-qt-data", "photo", f"train/p{i}.jpg", image))
    for culture, colour in (("aztec", (250, 250, 250)), ("boorong", (200, 160, 40))):
        for i in range(bench.MIN_CULTURE):
            image = Image.new("RGB", (48, 48), "black")
            ImageDraw.Draw(image).ellipse((8 + i, 8, 40, 30 + i), outline=colour, width=2)
            path = f"usr/share/stellarium/skycultures/{culture}/c{i}.png"
            rows.append(_row(directory, f"{culture}{i}", "stellarium-data", "constellation-art", path, image))
    for folder, colour in (("animals/birds", (30, 90, 200, 255)), ("food/fruit", (240, 120, 0, 255))):
        for i in range(bench.MIN_STAMP_GROUP):
            image = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
            ImageDraw.Draw(image).rectangle((5 + i, 5, 30, 35 - i), fill=colour)
            path = f"usr/share/tuxpaint/stamps/{folder}/s{i}.png"
            name = f"{folder.replace('/', '_')}{i}"
            rows.append(_row(directory, name, "tuxpaint-stamps-default", "cutout", path, image))
    manifest = directory / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("realdata"))


# ---- held-out sources only ---------------------------------------------------------------------------


def test_only_heldout_images_enter_the_benchmark(manifest):
    benchmark = bench.build_benchmark(manifest, seed=0, sizes=SMALL)

    origins = set(benchmark.pool.origin)
    assert origins and not any(origin.startswith("train") for origin in origins)
    assert {row["source"] for row in bench.load_heldout_rows(manifest)} == {
        "opencv-doc",
        "stellarium-data",
        "tuxpaint-stamps-default",
    }


def test_a_training_source_row_is_refused():
    with pytest.raises(ValueError, match="non-held-out"):
        bench.check_heldout([{"source": "opencv-doc"}, {"source": "scratch"}])


def test_a_source_without_a_split_is_an_error(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"source": "some-new-package", "kind": "photo", "path": "a.jpg"}) + "\n")
    with pytest.raises(ValueError, match="no split"):
        bench.load_heldout_rows(manifest)


def test_galleries_are_deterministic_and_identity_never_answers_lighting(manifest):
    first = bench.build_benchmark(manifest, seed=3, sizes=SMALL)
    second = bench.build_benchmark(manifest, seed=3, sizes=SMALL)

    assert [np.asarray(i).tobytes() for i in first.pool.images] == [np.asarray(i).tobytes() for i in second.pool.images]
    lighting = next(g for g in first.galleries if g.name == "lighting")
    pairs = [(group, first.pool.origin[i]) for i, group in zip(lighting.indices, lighting.groups, strict=True)]
    assert len(set(pairs)) == len(pairs)  # a photo appears at most once per lighting class
    cultures = next(g for g in first.galleries if g.name == "art style (ii) sky cultures")
    assert sorted(set(cultures.groups)) == ["aztec", "boorong"]
    for x, y, positive, negative in first.pairs:
        same_photo = first.pool.origin[x] == first.pool.origin[y]
        assert same_photo == (positive == "subject") and positive != negative


# ---- chance from the group sizes -----------------------------------------------------------------------


def test_chance_of_two_pairs_is_the_expected_reciprocal_rank():
    scores = bench.chance_scores(["a", "a", "b", "b"])  # each query: 3 candidates, 1 relevant at a random rank

    assert scores.map_at_k == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert scores.precision_at_k == pytest.approx(1 / 3)


def test_chance_precision_follows_the_group_sizes():
    groups = ["a"] * 12 + ["b"] * 8  # 19 candidates per query, more than k = 10

    scores = bench.chance_scores(groups)

    assert scores.precision_at_k == pytest.approx((12 * 11 / 19 + 8 * 7 / 19) / 20)


# ---- every held-out transform does what it claims ----------------------------------------------------


def _luma(x: np.ndarray) -> np.ndarray:
    return x @ np.asarray([0.299, 0.587, 0.114])


def _apply(name: str, x: np.ndarray) -> np.ndarray:
    function = bench.LIGHTINGS.get(name) or bench.STYLES[name]
    out = function(x, np.random.default_rng(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    return out


def test_gamma_changes_exposure():
    x = photo_array()
    assert _luma(_apply("gamma-dark", x)).mean() < _luma(x).mean() - 0.1
    assert _luma(_apply("gamma-bright", x)).mean() > _luma(x).mean() + 0.1


@pytest.mark.parametrize(
    ("name", "lit", "dim"),
    [
        ("spotlight-left", np.s_[:, :20], np.s_[:, -20:]),
        ("spotlight-right", np.s_[:, -20:], np.s_[:, :20]),
        ("spotlight-top", np.s_[:20, :], np.s_[-20:, :]),
    ],
)
def test_spotlight_lights_its_side(name, lit, dim):
    x = np.full((64, 64, 3), 0.5, dtype=np.float32)
    out = _luma(_apply(name, x))
    assert out[lit].mean() > 1.5 * out[dim].mean()


def test_casts_shift_colour_temperature():
    x = photo_array()
    balance = x[..., 0].mean() - x[..., 2].mean()
    warm, cool = _apply("warm cast", x), _apply("cool cast", x)
    assert warm[..., 0].mean() - warm[..., 2].mean() > balance + 0.05
    assert cool[..., 0].mean() - cool[..., 2].mean() < balance - 0.05


def test_local_contrast_hard_and_soft():
    x = photo_array(size=bench.SIZE)  # the benchmark's image size: the local mean is ~10 px wide

    def detail(image: np.ndarray) -> float:
        gray = _luma(image)
        return float((gray - ndimage.gaussian_filter(gray, 10)).std())

    def shading(image: np.ndarray) -> float:
        return float(ndimage.gaussian_filter(_luma(image), 10).std())

    hard, soft = _apply("local-contrast hard", x), _apply("local-contrast soft", x)
    assert detail(hard) > 1.4 * detail(x)
    assert shading(soft) < 0.6 * shading(x) and detail(soft) > 0.8 * detail(x)


def test_haze_is_blue_white_and_denser_at_the_top():
    x = photo_array()
    out = _apply("blue-white haze", x)
    assert _luma(out).std() < 0.8 * _luma(x).std()
    assert out[..., 2].mean() - out[..., 0].mean() > x[..., 2].mean() - x[..., 0].mean()
    assert np.abs(out - x)[:10].mean() > np.abs(out - x)[-10:].mean()


def test_posterise_uses_only_the_palette_and_hue_rotation_turns_it():
    palette = np.asarray([[0.9, 0.1, 0.1], [0.1, 0.1, 0.1], [0.9, 0.9, 0.8]], dtype=np.float32)
    out = bench.posterise_to(palette)(photo_array(), np.random.default_rng(0))
    colours = np.unique(out.reshape(-1, 3), axis=0)
    assert len(colours) >= 2 and all((np.abs(palette - c).sum(1) < 1e-6).any() for c in colours)
    turned = bench.rotate_hue(palette, 120)
    np.testing.assert_allclose(turned[0], [0.1, 0.9, 0.1], atol=1e-6)  # red -> green, value and saturation kept
    np.testing.assert_allclose(bench.rotate_hue(palette, 360), palette, atol=1e-6)


def test_ink_wash_and_emboss_are_grey():
    x = photo_array()
    for name in ("ink wash", "emboss"):
        out = _apply(name, x)
        np.testing.assert_allclose(out[..., 0], out[..., 2])
    assert abs(np.median(_apply("emboss", x)) - 0.5) < 0.1


def test_engraving_is_two_tone_and_mosaic_is_piecewise_flat():
    x = photo_array()
    assert len(np.unique(_apply("engraving", x).reshape(-1, 3), axis=0)) == 2
    tiles = np.unique(_apply("mosaic", x).reshape(-1, 3), axis=0)
    assert len(tiles) <= 321 and len(tiles) < len(np.unique(x.reshape(-1, 3), axis=0)) / 5


def test_crayon_leaves_paper_showing_and_saturates():
    x = photo_array()
    out = _apply("crayon", x)
    paper = np.all(out == np.float32(0.98), axis=-1)
    assert 0.05 < paper.mean() < 0.95

    def saturation(image: np.ndarray) -> float:
        return float((image.max(-1) - image.min(-1)).mean())

    assert saturation(out[~paper]) > saturation(x)


# ---- end to end ----------------------------------------------------------------------------------------


def test_runs_end_to_end_with_a_tiny_encoder(manifest, tmp_path, capsys):
    encoder_dir = tmp_path / "encoder"
    AttributeEncoder(tiny_compact_config(image_size=64)).save_pretrained(encoder_dir)
    out = tmp_path / "out" / "heldout_real.json"

    assert bench.main(["--model", f"tiny={encoder_dir}", "--manifest", str(manifest), "--out", str(out)], SMALL) == 0

    printed = capsys.readouterr().out
    assert "| lighting | 'lighting' |" in printed and "0 (by construction" in printed
    data = json.loads(out.read_text())
    assert set(data["rows"]) == set(bench.ROWS)
    for row, cells in data["rows"].items():
        for model in ("chance", "holistic (trunk)", "tiny"):
            map_at_k, precision = cells["typed phrase"][model]
            assert 0 <= map_at_k <= 1 and 0 <= precision <= 1, (row, model)
    assert set(data["delta"]["tiny"]) == {"typed", "paraphrase"}
    assert len(list(out.parent.glob("heldout_real_*.png"))) == len(bench.ROWS) - 2  # one per gallery
