"""Transfer score with the real attribute encoder (a tiny random mllm encoder from encoder.testing)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from encoder import AttributeEncoder
from encoder import testing as encoder_testing
from encoder.testing import tiny_compact_config
from generator_plugin.testing import tiny_generator, tiny_prompt_embeds
from tests.generator_plugin.conftest import settings


@pytest.fixture(scope="module")
def attribute_encoder(tmp_path_factory):
    return encoder_testing.tiny_mllm_encoder(tmp_path_factory.mktemp("tiny-qwen-vl"), seed=0).eval()


def reference_images() -> list[PIL.Image.Image]:
    generator = np.random.default_rng(0)
    return [PIL.Image.fromarray(generator.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]


def pooled(attribute_encoder, images, attributes) -> torch.Tensor:
    with torch.no_grad():
        return attribute_encoder.encode(images, attributes).pooled.float()


def test_each_output_is_scored_under_each_requested_attribute(attribute_encoder):
    images, attributes = reference_images(), ["image lighting", "art style"]
    with torch.no_grad():
        token_width = attribute_encoder.encode(images[:1], attributes[:1]).tokens.shape[-1]
    pipe = tiny_generator(seed=0, token_dim=token_width)
    prompt_embeds, pooled_prompt = tiny_prompt_embeds(pipe)
    prompt = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt}
    refs = [(images[0], attributes[0], 1.0), (images[1], attributes[1], 0.5)]

    output = pipe.compose(refs, attribute_encoder=attribute_encoder, **prompt, **settings(num_images_per_prompt=2))

    assert output.attributes == attributes
    assert output.transfer_scores.shape == (2, 2)
    reference = pooled(attribute_encoder, images, attributes)  # (N, d)
    for b, generated in enumerate(output.images):
        expected = F.cosine_similarity(pooled(attribute_encoder, [generated] * 2, attributes), reference, dim=-1)
        torch.testing.assert_close(output.transfer_scores[b], expected, atol=1e-5, rtol=0)
    assert output.transfer_scores.abs().max() <= 1.0 + 1e-6


def test_references_are_encoded_with_the_encoder(attribute_encoder):
    images, attributes = reference_images(), ["image lighting", "art style"]
    with torch.no_grad():
        embeddings = attribute_encoder.encode(images, attributes)
    pipe = tiny_generator(seed=0, token_dim=embeddings.tokens.shape[-1])
    prompt_embeds, pooled_prompt = tiny_prompt_embeds(pipe)
    prompt = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt}

    pipe.attribute_encoder = attribute_encoder
    from_images = pipe.personalize([(images[0], attributes[0])], **prompt, **settings(output_type="np"))
    from_tokens = pipe.personalize(attribute_tokens=embeddings.tokens[:1], **prompt, **settings(output_type="np"))

    assert np.abs(from_images.images - from_tokens.images).max() <= 1e-5
    assert from_images.transfer_scores.shape == (1, 1)
    assert from_tokens.transfer_scores is None  # precomputed tokens carry no reference to compare with


# ---- held-out real cases (bench/transfer_score.py --real), on a tiny manifest built here --------------------


def _load_transfer_score():
    """bench/ is not a package: the script is imported by path (it imports bench.heldout_real itself)."""
    script = Path(__file__).resolve().parents[2] / "bench" / "transfer_score.py"
    spec = importlib.util.spec_from_file_location("transfer_score", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["transfer_score"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


transfer_score = _load_transfer_score()
TRAIN_COLOUR = (255, 0, 255)  # every training-source image is flat magenta: it must never show up in a case


def _photo(seed: int, size: int = 64) -> PIL.Image.Image:
    """A colourful 'photo': gradients and a few discs, different per seed."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / size
    image = np.stack([0.3 + 0.4 * xs, 0.2 + 0.5 * ys, 0.6 - 0.3 * xs * ys], axis=-1) * rng.uniform(0.6, 1.0, 3)
    for _ in range(4):
        cy, cx, radius = rng.uniform(0.1, 0.9, 3) * (1, 1, 0.3)
        image[(ys - cy) ** 2 + (xs - cx) ** 2 < radius**2] = rng.uniform(0, 1, 3)
    return PIL.Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Ten held-out photos (opencv-doc) and four training-source photos (gcompris-qt-data, flat magenta)."""
    root = tmp_path_factory.mktemp("realdata")
    (root / "images").mkdir()
    rows = []
    for index in range(14):
        heldout = index < 10
        name = f"photo{index}" if heldout else f"train{index}"
        image = _photo(index) if heldout else PIL.Image.new("RGB", (64, 64), TRAIN_COLOUR)
        image.save(root / f"images/{name}.png")
        source = "opencv-doc" if heldout else "gcompris-qt-data"
        rows.append({"id": name, "file": f"images/{name}.png", "source": source, "kind": "photo",
                     "path": f"data/{name}.png"})  # fmt: skip
    (root / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root / "manifest.jsonl"


@pytest.fixture(scope="module")
def compact_encoder():
    return AttributeEncoder(tiny_compact_config(image_size=64)).eval()


def test_real_cases_are_heldout_photos_under_heldout_transforms(manifest):
    cases = transfer_score.make_real_cases(manifest, count=6, seed=0)
    again = transfer_score.make_real_cases(manifest, count=6, seed=0)

    assert [case.factor for case in cases] == list(transfer_score.REAL_FACTORS) * 2
    assert [case.attribute for case in cases] == ["lighting", "color palette", "art style"] * 2
    heldout = [np.asarray(_photo(i).resize((224, 224))) for i in range(10)]
    for case, same in zip(cases, again, strict=True):
        for image in (case.reference, case.other, case.base):
            pixels = np.asarray(image)
            assert pixels.shape == (224, 224, 3)
            assert not (pixels == TRAIN_COLOUR).all(axis=-1).mean() > 0.5  # no training-source image
        for first, second in ((case.reference, same.reference), (case.other, same.other), (case.base, same.base)):
            assert np.array_equal(np.asarray(first), np.asarray(second))  # seeded
        assert not np.array_equal(np.asarray(case.reference), np.asarray(case.other))
        # The base is an untransformed held-out photo (the user's own); the references are transformed.
        base = np.asarray(case.base).astype(int)
        assert min(np.abs(base - photo).mean() for photo in heldout) < 6
        assert min(np.abs(np.asarray(case.reference).astype(int) - photo).mean() for photo in heldout) > 1
    text_only = transfer_score.make_real_cases(manifest, count=3, seed=0, with_base=False)
    assert all(case.base is None for case in text_only)


def test_apply_to_my_image_scores_wins_and_the_subject_kept(manifest, compact_encoder, tmp_path):
    cases = transfer_score.make_real_cases(manifest, count=3, seed=1)
    with torch.no_grad():
        width = compact_encoder.encode([cases[0].reference], ["lighting"]).tokens.shape[-1]
    pipe = tiny_generator(seed=0, token_dim=width)
    prompt_embeds, pooled_prompt = tiny_prompt_embeds(pipe)
    common = dict(
        size=64,
        steps=3,
        strength=0.6,
        prompt_inputs={"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt},
    )

    with_attribute = transfer_score.run_cases(pipe, compact_encoder, cases, attribute_scale=3.0, **common)
    control = transfer_score.run_cases(pipe, compact_encoder, cases, use_attribute=False, **common)

    for summary in (with_attribute, control):
        assert summary["cases"] == 3 and 0 <= summary["true_wins"] <= 1
        assert set(summary["per_factor"]) == set(transfer_score.REAL_FACTORS)
        assert -1 <= summary["mean_subject"] <= 1
        for row, case in zip(summary["rows"], cases, strict=True):
            assert row["subject"] == pytest.approx(
                transfer_score.subject_cosine(compact_encoder, row["image"], case.base)
            )
    # The attribute changes the output; the base image is where both start from.
    first = np.asarray(with_attribute["rows"][0]["image"], dtype=float)
    assert np.abs(first - np.asarray(control["rows"][0]["image"], dtype=float)).mean() > 0.5
    other_base = [transfer_score.TransferCase(**{**vars(cases[0]), "base": cases[1].base})]
    moved = transfer_score.run_cases(pipe, compact_encoder, other_base, use_attribute=False, **common)
    assert (
        np.abs(np.asarray(moved["rows"][0]["image"], dtype=float) - np.asarray(control["rows"][0]["image"])).mean()
        > 0.5
    )

    grid = tmp_path / "grid.png"
    transfer_score.save_grid(cases, with_attribute["rows"], control["rows"], grid, size=64)
    assert PIL.Image.open(grid).size == (4 * 64, 14 + 3 * 64)


def test_base_needs_the_real_manifest():
    with pytest.raises(SystemExit):
        transfer_score.main(["--generator", "nowhere", "--base"])
