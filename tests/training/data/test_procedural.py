"""The procedural pair generator: determinism, labels that match the factors, and factors that show."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data.pairs import PAIRS_FILENAME, load_pairs
from training.data.procedural import (
    FACTORS,
    ProceduralConfig,
    caption_for,
    change_factor,
    check_factor_names,
    generate_dataset,
    main,
    pair_rng,
    parse_hold_out,
    render_image,
    sample_factors,
    sample_pair,
)
from training.data.procedural_assets import SUBJECTS

SIZE = 64  # small images keep the suite fast; the generator's default is 128

BASE = {
    "category": "star",
    "identity": "star/5-sharp",
    "color": "orange",
    "material": "checkered",
    "pose": "rot030",
    "layout": "medium-center",
    "background": "sky-gradient",
    "lighting": "left/neutral/normal",
    "style": "photographic",
}


def pixels(factors, jitter_seed=None) -> np.ndarray:
    return np.asarray(render_image(factors, size=SIZE, jitter_seed=jitter_seed), dtype=np.float32)


def test_registry_has_the_required_factors_with_distinct_paraphrases():
    assert set(FACTORS) >= {
        "identity", "category", "color", "material", "lighting", "background", "style", "pose", "layout"
    }  # fmt: skip
    owner = {}
    for name, factor in FACTORS.items():
        assert len(factor.paraphrases) >= 6, name
        assert len(factor.values()) >= 2, name
        for phrase in factor.paraphrases:
            assert phrase not in owner, f"{phrase!r} names both {owner.get(phrase)} and {name}"
            owner[phrase] = name


def test_render_gives_an_rgb_image_of_the_asked_size():
    image = render_image(BASE, size=SIZE)

    assert image.mode == "RGB" and image.size == (SIZE, SIZE)
    assert np.asarray(image).std() > 5  # not a blank frame


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in FACTORS])
def test_every_value_of_every_factor_changes_the_pixels(name):
    base = pixels(BASE)
    for value in FACTORS[name].values():
        if value == BASE[name]:
            continue
        factors = dict(BASE, **{name: value})
        if name == "category":  # a category shows through an identity of that category
            factors["identity"] = FACTORS["identity"].choices(factors)[0]
        elif name == "identity":
            factors["category"] = SUBJECTS[value].category
        difference = np.abs(pixels(factors) - base).mean()
        assert difference > 0.5, f"{name}={value!r} changes the image by only {difference:.3f} levels"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_changing_one_factor_on_random_scenes_changes_the_pixels(seed):
    rng = np.random.default_rng(seed)
    values = sample_factors(rng)
    base = pixels(values, jitter_seed=seed)
    for name in FACTORS:
        changed = change_factor(values, name, rng)
        assert changed[name] != values[name] or len(FACTORS[name].choices(changed)) == 1
        if changed[name] != values[name]:
            assert not np.array_equal(pixels(changed, jitter_seed=seed), base), (name, values, changed)


def test_changing_the_category_redraws_the_identity_inside_the_new_category():
    changed = change_factor(BASE, "category", np.random.default_rng(0))

    assert changed["category"] != "star"
    assert SUBJECTS[changed["identity"]].category == changed["category"]
    assert {name: value for name, value in changed.items() if name not in ("category", "identity")} == {
        name: value for name, value in BASE.items() if name not in ("category", "identity")
    }


def test_jitter_is_a_small_nuisance_and_reproducible():
    first, again, other = pixels(BASE, 11), pixels(BASE, 11), pixels(BASE, 12)

    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_positives_and_negatives_match_the_factors():
    for index in range(300):
        spec = sample_pair(pair_rng(4, index))
        shared = {name for name in FACTORS if spec.factors_x[name] == spec.factors_y[name]}
        differing = set(FACTORS) - shared
        assert spec.positive and spec.negative
        assert {name for _, name in spec.positive} <= shared
        assert {name for _, name in spec.negative} == differing  # every difference is named
        for phrase, name in spec.positive + spec.negative:
            assert phrase in FACTORS[name].paraphrases
        for factors in (spec.factors_x, spec.factors_y):
            assert SUBJECTS[factors["identity"]].category == factors["category"]


def test_pairs_vary_in_how_much_they_share():
    specs = [sample_pair(pair_rng(5, index)) for index in range(300)]
    negative_counts = {len(spec.negative) for spec in specs}
    positive_counts = {len(spec.positive) for spec in specs}
    named = {name for spec in specs for _, name in spec.positive + spec.negative}

    assert min(negative_counts) == 1 and max(negative_counts) >= 7
    assert min(positive_counts) == 1 and max(positive_counts) >= 6
    assert named == set(FACTORS)


def test_held_out_combinations_are_never_drawn_but_can_be_rendered():
    hold_out = ({"category": "star", "color": "red"}, {"style": "photographic"})
    config = ProceduralConfig(size=SIZE, hold_out=hold_out)
    for index in range(300):
        spec = sample_pair(pair_rng(6, index), config)
        for factors in (spec.factors_x, spec.factors_y):
            assert factors["style"] != "photographic"
            assert not (factors["category"] == "star" and factors["color"] == "red")

    gallery = dict(BASE, color="red", style="photographic")  # the unseen combination, for evaluation
    assert render_image(gallery, size=SIZE).size == (SIZE, SIZE)


def test_changeable_limits_what_differs():
    config = ProceduralConfig(changeable=("lighting", "background"))
    for index in range(100):
        spec = sample_pair(pair_rng(7, index), config)
        assert {name for _, name in spec.negative} <= {"lighting", "background"}


def test_unknown_factor_names_raise_value_error_listing_the_known_ones():
    known = ", ".join(FACTORS)
    with pytest.raises(ValueError, match=f"unknown factor 'lightning'; known factors: {known}"):
        check_factor_names(["color", "lightning"])
    with pytest.raises(ValueError, match="unknown factor 'lightning'"):
        ProceduralConfig(hold_out=({"lightning": "left/warm/dim"},))
    with pytest.raises(ValueError, match="unknown factor 'colour'"):
        ProceduralConfig(changeable=("colour",))
    with pytest.raises(ValueError, match="unknown factor 'colour'"):
        sample_factors(np.random.default_rng(0), fixed={"colour": "red"})
    with pytest.raises(ValueError, match="unknown factor 'mood'"):
        change_factor(BASE, "mood", np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown factor 'mood'"):
        render_image(dict(BASE, mood="happy"), size=SIZE)


def test_bad_values_and_missing_factors_raise_value_error():
    with pytest.raises(ValueError, match="'magenta' is not a value of factor 'color'"):
        render_image(dict(BASE, color="magenta"), size=SIZE)
    with pytest.raises(ValueError, match="'face/00' is not a value of factor 'identity'"):
        render_image(dict(BASE, identity="face/00"), size=SIZE)  # an identity outside its category
    with pytest.raises(ValueError, match="missing for style"):
        render_image({name: value for name, value in BASE.items() if name != "style"}, size=SIZE)
    with pytest.raises(ValueError, match="at least 32 pixels"):
        ProceduralConfig(size=16)
    with pytest.raises(ValueError, match="factor=value"):
        parse_hold_out("color:red")
    assert parse_hold_out("category = star, color=red") == {"category": "star", "color": "red"}


def test_captions_describe_the_factor_values():
    caption = caption_for(BASE)

    assert caption.startswith("A photo of an orange checkered sharp five-pointed star, tilted 30 degrees to the left")
    assert "blue sky gradient" in caption and "lit from the left by white light" in caption
    assert caption_for(dict(BASE, color="teal")).startswith("A photo of a teal checkered")
    assert len({caption_for(BASE, template) for template in range(3)}) == 3


def read_tree(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()
    }


@pytest.mark.slow
def test_same_seed_writes_the_same_bytes_and_the_dataset_loads_clean(tmp_path: Path):
    config = ProceduralConfig(size=SIZE)
    assert generate_dataset(tmp_path / "a", 6, seed=3, config=config, flush_every=4) == 6
    generate_dataset(tmp_path / "b", 6, seed=3, config=config, workers=2)  # parallel rendering, same bytes
    generate_dataset(tmp_path / "c", 6, seed=4, config=config)

    first, again, other = read_tree(tmp_path / "a"), read_tree(tmp_path / "b"), read_tree(tmp_path / "c")
    assert first == again
    assert len(first) == 13  # 12 images and pairs.jsonl
    assert first[PAIRS_FILENAME] != other[PAIRS_FILENAME]
    report = load_pairs(tmp_path / "a")
    assert report.bad_lines == [] and len(report.records) == 6
    for record in report.records:
        assert record.source == "procedural" and record.meta["size"] == SIZE
        for phrase, name in zip(record.positive, record.positive_factors, strict=True):
            assert record.factors_x[name] == record.factors_y[name], phrase
        for phrase, name in zip(record.negative, record.negative_factors, strict=True):
            assert record.factors_x[name] != record.factors_y[name], phrase
        # the stored factors and jitter seed rebuild the stored image exactly
        rebuilt = render_image(record.factors_y, size=SIZE, jitter_seed=record.meta["jitter_y"])
        stored = np.asarray(Image.open(tmp_path / "a" / record.image_y))
        assert np.array_equal(np.asarray(rebuilt), stored)


def test_generate_refuses_to_mix_into_an_existing_dataset(tmp_path: Path):
    generate_dataset(tmp_path, 1, seed=0, config=ProceduralConfig(size=SIZE))
    with pytest.raises(FileExistsError, match="new --out directory"):
        generate_dataset(tmp_path, 1, seed=0, config=ProceduralConfig(size=SIZE))


def test_command_line_writes_a_dataset_and_reports_bad_arguments(tmp_path: Path, capsys):
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--pairs", "2", "--seed", "1", "--size", str(SIZE), "--hold-out",
                 "color=red"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["pairs"] == 2
    assert len(load_pairs(out).records) == 2

    assert main(["--out", str(tmp_path / "x"), "--pairs", "2", "--seed", "1", "--hold-out", "lightning=left"]) == 2
    assert "unknown factor 'lightning'" in capsys.readouterr().err


@pytest.mark.slow
def test_module_runs_as_a_script(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "training.data.procedural", "--out", str(tmp_path / "m"), "--pairs", "1", "--seed", "2",
         "--size", str(SIZE)],
        capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[3],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m" / PAIRS_FILENAME).is_file()


def test_fixed_values_are_kept_and_a_fixed_identity_gets_its_own_category():
    rng = np.random.default_rng(8)
    for _ in range(20):
        values = sample_factors(rng, fixed={"identity": "coin/03", "style": "halftone"})
        assert values["category"] == "coin" and values["identity"] == "coin/03" and values["style"] == "halftone"
    gallery = sample_factors(rng, fixed={"category": "star", "color": "red"})  # an unseen combination
    assert gallery["identity"].startswith("star/") and gallery["color"] == "red"
