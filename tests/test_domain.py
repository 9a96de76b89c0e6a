"""The domain rules are defined once and every path (training, indexing, search, the encoder) uses them."""

from __future__ import annotations

import json

import pytest

from encoder.attributes import attribute_phrase
from omniattr import domain
from store import metadata
from store.errors import InvalidInputError
from training.data.pairs import load_pairs

VARIANTS = ["Lighting", "  lighting ", "lighting\u200b", "LIGHTING\n", "ｌｉｇｈｔｉｎｇ"]  # the last is full-width


@pytest.mark.parametrize("text", VARIANTS)
def test_one_normaliser_serves_training_indexing_and_search(tmp_path, text):
    """A phrase written any of these ways is the same attribute for the encoder, the store and a pair file."""
    assert domain.normalize_attribute(text) == "lighting"
    assert attribute_phrase(text) == "lighting"  # what the encoder reads, at indexing and at search time
    assert metadata.normalize_attribute(text) == "lighting"  # what the store keys vectors by
    (tmp_path / "x.png").write_bytes(b"")  # existence is all load_pairs checks without verify_images
    record = {"image_x": "x.png", "image_y": "x.png", "caption_x": "a", "caption_y": "b",
              "positive": [text], "negative": ["Art  Style"]}  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text(json.dumps(record) + "\n")
    report = load_pairs(tmp_path, verify_images=False)
    assert report.bad_lines == []
    [pair] = report.records
    assert pair.positive == ("lighting",) and pair.negative == ("art style",)  # what training reads


def test_bad_attribute_text_is_one_error_with_advice():
    for bad in ["", "\u200b", "x" * (domain.MAX_ATTRIBUTE_CHARS + 1), "a\x00b"]:
        with pytest.raises(domain.InvalidTextError):
            domain.normalize_attribute(bad)
        with pytest.raises(InvalidInputError):
            metadata.normalize_attribute(bad)


@pytest.mark.parametrize(
    ("attributes", "kept"),
    [
        (["lighting"], domain.DEFAULT_KEEP_DETAIL),
        (["lighting", "color palette"], domain.DEFAULT_KEEP_DETAIL),
        (["man hairstyle"], domain.DEFAULT_KEEP_DETAIL),  # a whole word only: a hairstyle is a shape
        (["stylish"], domain.DEFAULT_KEEP_DETAIL),
        (["Art Style"], 0.0),
        (["lighting", "painting style"], 0.0),  # one texture reference is enough
        (["surface texture"], 0.0),
        (["textures"], 0.0),
    ],
)
def test_apply_to_my_image_keeps_no_detail_by_default_for_a_style_or_texture(attributes, kept):
    assert domain.default_keep_detail(attributes) == kept


def test_every_job_kind_has_a_shard_body():
    assert {kind.shard_kind for kind in domain.JobKind} == set(domain.ShardKind)
    assert domain.JobKind("index_new_images").shard_kind is domain.ShardKind.INDEX
