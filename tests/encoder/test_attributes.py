"""Attribute text validation and the phrase the backbones read."""

from __future__ import annotations

import pytest

from encoder.attributes import MAX_ATTRIBUTE_CHARS, attribute_phrase, attribute_phrases, normalize_attribute


def test_whitespace_is_normalised():
    assert normalize_attribute("  image \n lighting\t") == "image lighting"


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_attribute_is_refused(text):
    with pytest.raises(ValueError, match=r"attribute text is empty; name the attribute in a few words"):
        normalize_attribute(text)


def test_overlong_and_non_string_attributes_are_refused():
    with pytest.raises(ValueError, match="name the attribute in a few words"):
        normalize_attribute("x" * (MAX_ATTRIBUTE_CHARS + 1))
    with pytest.raises(ValueError, match="must be a string"):
        normalize_attribute(None)


def test_several_attributes_are_joined_as_in_the_paper():
    assert attribute_phrase("lighting") == "lighting"
    assert attribute_phrase(["man identity", "man hairstyle"]) == "man identity, and man hairstyle"
    assert attribute_phrase(["a", "b", "c"]) == "a, b, and c"


def test_lists_name_the_bad_entry():
    with pytest.raises(ValueError, match="attribute 1: attribute text is empty"):
        attribute_phrases(["lighting", " "])
    with pytest.raises(ValueError, match="not a single string"):
        attribute_phrases("lighting")
    with pytest.raises(ValueError, match="no attributes"):
        attribute_phrases([])
