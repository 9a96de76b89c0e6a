"""Attribute-conditioned search: one or several weighted (vector, attribute) terms, with negative terms.

A term's query vector lives in its attribute's space (the encoder's pooled embedding under that attribute),
so a candidate is scored per term against its *own* vector under the same attribute:

    total(c) = sum_i w_i * cos(q_i, v(c, a_i))  -  sum_j u_j * cos(n_j, v(c, b_j))

Candidates come from each positive term's filtered top-k (over-fetched), then every candidate is rescored
exactly with its stored vectors, so fused scores are not limited to what each term's own top-k saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from omniattr.domain import MAX_SEARCH_RESULTS, MAX_SEARCH_TERMS
from store.errors import InvalidInputError
from store.vectors import VectorIndex, point_id

# The most results one search returns.


@dataclass(frozen=True)
class SearchTerm:
    """A query vector in an attribute's space, with a weight (> 0; negatives subtract it)."""

    vector: np.ndarray
    attribute_id: int
    attribute: str
    weight: float = 1.0
    exclude_image_id: int | None = None  # the query image itself, when it came from the collection


@dataclass(frozen=True)
class RankedImage:
    """One result: total score and the score of each term's attribute (negatives reported as similarity)."""

    image_id: int
    score: float
    attribute_scores: dict[str, float] = field(default_factory=dict)
    negative_scores: dict[str, float] = field(default_factory=dict)


def search_images(
    vectors: VectorIndex,
    *,
    encoder_version: str,
    collection_id: int | None,
    terms: Sequence[SearchTerm],
    negatives: Sequence[SearchTerm] = (),
    limit: int = 20,
    payload_filter: dict | None = None,
    overfetch: int = 4,
) -> list[RankedImage]:
    """Rank images by the weighted sum of their per-attribute similarities, minus the negative terms."""
    if not terms:
        raise InvalidInputError("a search needs at least one positive term (an image and an attribute)")
    if len(terms) + len(negatives) > MAX_SEARCH_TERMS:
        raise InvalidInputError(f"at most {MAX_SEARCH_TERMS} terms in one search; got {len(terms) + len(negatives)}")
    if not 1 <= limit <= MAX_SEARCH_RESULTS:
        raise InvalidInputError(f"limit must be between 1 and {MAX_SEARCH_RESULTS}; got {limit}")
    for term in (*terms, *negatives):
        if not term.weight > 0:
            raise InvalidInputError(f"weights must be positive (negatives use the negative list); got {term.weight}")
    excluded = sorted({t.exclude_image_id for t in (*terms, *negatives) if t.exclude_image_id is not None})

    if len(terms) == 1 and not negatives:  # the common case: one index query, scores exact already
        (term,) = terms
        hits = vectors.search(
            encoder_version=encoder_version,
            vector=term.vector,
            collection_id=collection_id,
            attribute_id=term.attribute_id,
            limit=limit,
            exclude_image_ids=excluded,
            payload_filter=payload_filter,
        )
        return [RankedImage(hit.image_id, term.weight * hit.score, {term.attribute: hit.score}) for hit in hits]

    candidates: dict[int, None] = {}
    for term in terms:
        hits = vectors.search(
            encoder_version=encoder_version,
            vector=term.vector,
            collection_id=collection_id,
            attribute_id=term.attribute_id,
            limit=min(limit * overfetch, MAX_SEARCH_RESULTS * overfetch),
            exclude_image_ids=excluded,
            payload_filter=payload_filter,
        )
        candidates.update((hit.image_id, None) for hit in hits)
    image_ids = list(candidates)
    if not image_ids:
        return []
    positive = _term_scores(vectors, encoder_version, image_ids, terms)  # (terms, candidates)
    negative = _term_scores(vectors, encoder_version, image_ids, negatives)
    weights = np.array([t.weight for t in terms])[:, None]
    total = (weights * positive).sum(axis=0)
    if negatives:
        total -= (np.array([t.weight for t in negatives])[:, None] * negative).sum(axis=0)
    order = np.argsort(-total, kind="stable")[:limit]
    return [
        RankedImage(
            image_id=image_ids[c],
            score=float(total[c]),
            attribute_scores=_named(terms, positive[:, c]),
            negative_scores=_named(negatives, negative[:, c]),
        )
        for c in order
    ]


def _term_scores(
    vectors: VectorIndex, encoder_version: str, image_ids: list[int], terms: Sequence[SearchTerm]
) -> np.ndarray:
    """cos(q_t, v(image, a_t)) for every term and candidate: (T, C); 0 where a vector is missing."""
    scores = np.zeros((len(terms), len(image_ids)), dtype=np.float64)
    if not terms:
        return scores
    ids = {
        (t, c): str(point_id(image_id=image_id, attribute_id=term.attribute_id, encoder_version=encoder_version))
        for t, term in enumerate(terms)
        for c, image_id in enumerate(image_ids)
    }
    stored = vectors.fetch(encoder_version=encoder_version, point_ids=list(set(ids.values())))
    for (t, c), key in ids.items():
        vector = stored.get(key)
        if vector is not None:
            query = terms[t].vector
            scores[t, c] = float(np.dot(query, vector) / (np.linalg.norm(query) * np.linalg.norm(vector) + 1e-12))
    return scores


def _named(terms: Sequence[SearchTerm], values: np.ndarray) -> dict[str, float]:
    named: dict[str, float] = {}
    for term, value in zip(terms, values, strict=True):
        key = term.attribute if term.attribute not in named else f"{term.attribute} ({len(named) + 1})"
        named[key] = round(float(value), 6)
    return named
