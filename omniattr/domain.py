"""The product's domain rules, defined once: statuses, job kinds, attribute text and request limits.

A leaf module (standard library only) that every package may import, the encoder and the store included, so
training, indexing, search and the API cannot disagree on what an attribute is or what a status is called.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from enum import StrEnum

# Attribute names are short noun phrases ("man hairstyle", "image lighting"); a paragraph is a mistake.
MAX_ATTRIBUTE_CHARS = 200
# Collection and other user-given names.
MAX_NAME_CHARS = 200
# References one generation may compose (personalize is one); also the most terms one search may fuse.
MAX_REFERENCES = 8
# Apply to my image (img2img): how much of the schedule runs from the base image when no strength is given.
# 1.0 would start from pure noise (the base ignored); 0.6 keeps its layout and subject and leaves the adapter
# the last 60 % of the steps to change lighting, colour and style (diffusers' FluxImg2ImgPipeline default).
DEFAULT_BASE_STRENGTH = 0.6
# Apply to my image: the output keeps the base image's detail finer than this Gaussian sigma, in output pixels
# (blur(output) + base - blur(base)); 0 is the generator's output as is. The 128 px starter generator draws a
# blurred copy of the base's layout, and 2 px gives its subject back (bench/RESULTS.md, "Keeping the base's
# detail in apply to my image"); it also keeps the base's texture, so a request whose attribute names a style or
# a texture (TEXTURE_ATTRIBUTE) keeps none by default (`default_keep_detail`).
DEFAULT_KEEP_DETAIL = 2.0
# Attribute texts whose value lives in fine texture: "art style", "painting style", "texture" (whole words, so
# "hairstyle" is not one). Keeping the base's detail replaces that texture: on 144 held-out cases art style wins
# 56 % as is against 48 % with the detail kept, 77 % against 65 % on the tuning cases (bench/RESULTS.md, "More
# transfer pairs for the adapter, and the scorer's ceiling on 144 cases").
TEXTURE_ATTRIBUTE = re.compile(r"\b(?:style|styles|texture|textures)\b")
MAX_KEEP_DETAIL = 32.0
MAX_SEARCH_TERMS = 8
# The most results one search returns.
MAX_SEARCH_RESULTS = 200


class ImageStatus(StrEnum):
    """An image row: decoded and stored (ready), waiting for its ingest shard (pending), or unreadable (failed)."""

    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"


class JobStatus(StrEnum):
    """A job's roll-up of its shards."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ShardStatus(StrEnum):
    """One shard of a job: a unit of work a worker takes by id."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class GenerationStatus(StrEnum):
    """A generation request's progress."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class IndexStatus(StrEnum):
    """Whether an attribute is searchable in a collection under an encoder."""

    INDEXING = "indexing"
    READY = "ready"
    FAILED = "failed"


class JobKind(StrEnum):
    """What a job does; `shard_kind` names the shard body (and Celery task) that runs its shards."""

    INGEST = "ingest"
    INDEX = "index"  # a backfill: new attributes over a collection's images
    INDEX_NEW_IMAGES = "index_new_images"  # new images under every attribute already indexed
    GENERATE = "generate"

    @property
    def shard_kind(self) -> ShardKind:
        return _SHARD_KIND_BY_JOB_KIND[self]


class ShardKind(StrEnum):
    """Which shard body runs a shard: the dispatch key of both dispatchers and of the Celery routing."""

    INGEST = "ingest"
    INDEX = "index"
    GENERATE = "generate"


_SHARD_KIND_BY_JOB_KIND = {
    JobKind.INGEST: ShardKind.INGEST,
    JobKind.INDEX: ShardKind.INDEX,
    JobKind.INDEX_NEW_IMAGES: ShardKind.INDEX,
    JobKind.GENERATE: ShardKind.GENERATE,
}

# Zero-width characters look like nothing but would make "lighting\u200b" an attribute of its own.
_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")


class InvalidTextError(ValueError):
    """User text (an attribute or a name) that breaks a rule; the message says what to pass instead."""


def clean_text(text: object, *, what: str, limit: int) -> str:
    """NFKC-normalised, zero-width characters removed, whitespace collapsed; error if empty or over `limit`."""
    if not isinstance(text, str):
        raise InvalidTextError(f"{what} must be a string, got {type(text).__name__}")
    text = " ".join(_INVISIBLE.sub("", unicodedata.normalize("NFKC", text)).split())
    if not text:
        raise InvalidTextError(f"{what} is empty")
    if "\x00" in text:
        raise InvalidTextError(f"{what} contains a NUL character; remove it")
    if len(text) > limit:
        raise InvalidTextError(f"{what} has {len(text)} characters; the limit is {limit}: {text[:40]!r}...")
    return text


def normalize_attribute(text: object) -> str:
    """The one canonical attribute text used by training, indexing and search: `clean_text`, lower case.

    "Lighting", " lighting " and "lighting\u200b" are the same attribute everywhere, so a phrase indexed
    by one path is found by another, and the encoder reads in search what it read in training.
    """
    try:
        return clean_text(text, what="attribute text", limit=MAX_ATTRIBUTE_CHARS).lower()
    except InvalidTextError as error:
        raise InvalidTextError(
            f"{error}; name the attribute in a few words, such as 'lighting' or 'art style'"
        ) from None


def default_keep_detail(attributes: Iterable[str]) -> float:
    """The detail apply to my image keeps when a request does not say: DEFAULT_KEEP_DETAIL, or 0 (the generator's
    output as is) when any reference's attribute names a style or a texture (TEXTURE_ATTRIBUTE)."""
    texture = any(TEXTURE_ATTRIBUTE.search(normalize_attribute(attribute)) for attribute in attributes)
    return 0.0 if texture else DEFAULT_KEEP_DETAIL


def normalize_name(text: object) -> str:
    """A collection (or other) name as stored: `clean_text`, case kept."""
    return clean_text(text, what="name", limit=MAX_NAME_CHARS)
