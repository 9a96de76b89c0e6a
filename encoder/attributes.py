"""Attribute text: the phrase the backbones read, after the one normalisation of `omniattr.domain`."""

from __future__ import annotations

from collections.abc import Sequence

from omniattr.domain import MAX_ATTRIBUTE_CHARS, normalize_attribute

__all__ = ["MAX_ATTRIBUTE_CHARS", "Attribute", "attribute_phrase", "attribute_phrases", "normalize_attribute"]

Attribute = str | Sequence[str]  # one attribute, or several encoded together ("identity", "hairstyle")


def attribute_phrase(attribute: Attribute) -> str:
    """One attribute or several -> 'a1', 'a1, and a2', 'a1, a2, and a3' (the paper's joining)."""
    names = [attribute] if isinstance(attribute, str) else list(attribute)
    if not names:
        raise ValueError("an attribute list is empty; pass at least one attribute, e.g. 'lighting'")
    names = [normalize_attribute(name) for name in names]
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + ", and " + names[-1]


def attribute_phrases(attributes: Sequence[Attribute]) -> list[str]:
    """Validate a list of attributes (each a string or a list of strings) into phrases."""
    if isinstance(attributes, str):
        raise ValueError("pass a list of attributes (one per image for encode), not a single string")
    phrases = []
    for index, attribute in enumerate(attributes):
        try:
            phrases.append(attribute_phrase(attribute))
        except ValueError as err:
            raise ValueError(f"attribute {index}: {err}") from err
    if not phrases:
        raise ValueError("no attributes given; pass at least one, e.g. ['lighting']")
    return phrases
