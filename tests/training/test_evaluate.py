"""Evaluation metrics against hand-computed values, and the harness end to end on a tiny gallery."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from encoder import AttributeEncoder
from encoder.testing import tiny_compact_config
from training.data.procedural import FACTORS, ProceduralConfig, generate_dataset
from training.evaluate import (
    HolisticTrunkEmbedder,
    delta_pos_neg,
    evaluate,
    make_gallery,
    ranked_metrics,
    retrieval_scores,
    write_markdown,
)


def _brute_force_expected(scores, relevant, k):
    """Average AP@k and P@k over every order of the tied candidates (the definition the metric follows)."""
    scores, relevant = np.asarray(scores), np.asarray(relevant)
    values = sorted(set(scores.tolist()), reverse=True)
    groups = [list(np.flatnonzero(scores == v)) for v in values]
    aps, precisions = [], []
    for orders in itertools.product(*(itertools.permutations(g) for g in groups)):
        ranking = [i for order in orders for i in order]
        rel = relevant[ranking][:k]
        depth = min(k, len(scores))
        hits = np.cumsum(rel)
        ap = sum(hits[i] / (i + 1) for i in range(depth) if rel[i]) / min(relevant.sum(), k)
        aps.append(ap)
        precisions.append(rel.sum() / depth)
    return float(np.mean(aps)), float(np.mean(precisions))


def test_ranked_metrics_hand_computed():
    # Ranking R N R N: AP = (1/2)(1/1 + 2/3) = 5/6, P@4 (= P@10 over 4 candidates) = 2/4.
    ap, precision = ranked_metrics([0.9, 0.8, 0.7, 0.6], [True, False, True, False], k=10)
    assert ap == pytest.approx(5 / 6)
    assert precision == pytest.approx(0.5)
    # k = 2 cuts: AP@2 = (1/min(2, 2)) * (1/1) = 1/2, P@2 = 1/2.
    assert ranked_metrics([0.9, 0.8, 0.7, 0.6], [True, False, True, False], k=2) == pytest.approx((0.5, 0.5))
    # All ties, n = 4, R = 2: p = 1/2, q = 1/3; AP = 1/2 * sum_i (1/i)(p + (i - 1) p q).
    expected_ap = 0.5 * (0.5 + (0.5 + 0.5 / 3) / 2 + (0.5 + 1 / 3) / 3 + (0.5 + 0.5) / 4)
    ap, precision = ranked_metrics([0.3] * 4, [True, False, True, False], k=10)
    assert ap == pytest.approx(expected_ap) and ap == pytest.approx(0.6805555555)
    assert precision == pytest.approx(0.5)
    with pytest.raises(ValueError, match="relevant"):
        ranked_metrics([0.1, 0.2], [False, False])


@pytest.mark.parametrize(
    ("scores", "relevant", "k"),
    [
        ([0.5, 0.5, 0.2, 0.9, 0.5, 0.2, 0.1], [1, 0, 1, 0, 1, 0, 1], 3),
        ([1, 1, 1, 0, 0, 0, 0, 2], [0, 1, 0, 1, 1, 0, 0, 0], 5),
        ([0.4, 0.4, 0.4, 0.4, 0.4, 0.4], [0, 0, 1, 0, 0, 1], 10),
    ],
)
def test_ranked_metrics_equal_the_average_over_tie_orders(scores, relevant, k):
    expected = _brute_force_expected(scores, np.array(relevant, dtype=bool), k)
    assert ranked_metrics(scores, np.array(relevant, dtype=bool), k) == pytest.approx(expected)


def test_retrieval_scores_perfect_and_constant_embeddings():
    rng = np.random.default_rng(0)
    values = [str(v) for v in rng.integers(0, 3, size=20)]  # 20 gallery images, 3 factor values
    counts = {v: values.count(v) for v in set(values)}
    one_hot = np.eye(3)[[int(v) for v in values]]
    perfect = retrieval_scores(one_hot + 0.0, values, k=10)
    assert perfect.map_at_k == pytest.approx(1.0)
    # P@10 of a perfect ranking is min(R, 10) / 10, R = images of the same value minus the query itself.
    assert perfect.precision_at_k == pytest.approx(np.mean([min(counts[v] - 1, 10) / 10 for v in values]))
    assert perfect.num_queries == 20
    constant = retrieval_scores(np.ones((20, 4)), values, k=10)
    # Chance: P@10 = R / 19 for every query (all 19 others tie).
    assert constant.precision_at_k == pytest.approx(np.mean([(counts[v] - 1) / 19 for v in values]))
    assert constant.map_at_k < perfect.map_at_k
    # A value seen once has no relevant image: that query is skipped.
    assert retrieval_scores(np.ones((3, 2)), ["a", "a", "b"], k=10).num_queries == 2


def test_delta_hand_computed_and_zero_for_attribute_blind_embeddings():
    # Pair 1: pos (1.0, 0.5) neg (0.25,) -> 0.75 - 0.25 = 0.5; pair 2: pos (0.2,) neg (0.4, 0.6) -> -0.3.
    delta, positive, negative = delta_pos_neg([([1.0, 0.5], [0.25]), ([0.2], [0.4, 0.6])])
    assert delta == pytest.approx((0.5 - 0.3) / 2)
    assert positive == pytest.approx((0.75 + 0.2) / 2) and negative == pytest.approx((0.25 + 0.5) / 2)
    # An embedding that ignores the attribute gives one cosine per pair: Delta is exactly 0.
    assert delta_pos_neg([([0.7, 0.7, 0.7], [0.7]), ([0.1], [0.1, 0.1])])[0] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        delta_pos_neg([([0.5], [])])


def test_make_gallery_is_seeded_and_pins_unseen_combinations():
    unseen = [{"category": "cat", "color": "red"}]
    gallery = make_gallery(6, seed=5, image_size=32, unseen=unseen, unseen_count=2)
    again = make_gallery(6, seed=5, image_size=32, unseen=unseen, unseen_count=2)
    assert gallery.factors == again.factors
    assert [np.asarray(i).tobytes() for i in gallery.images] == [np.asarray(i).tobytes() for i in again.images]
    assert all(f["category"] == "cat" and f["color"] == "red" for f in gallery.factors[:2])
    assert make_gallery(6, seed=6, image_size=32).factors != gallery.factors


@pytest.mark.slow
def test_evaluate_tiny_end_to_end(tmp_path):
    torch.set_num_threads(1)
    generate_dataset(tmp_path / "pairs", 3, seed=4, config=ProceduralConfig(size=64))
    torch.manual_seed(0)
    encoder = AttributeEncoder(tiny_compact_config(image_size=64))
    factors = ["category", "color", "background", "lighting"]
    results = evaluate(
        {"tiny": encoder},
        pairs_dir=tmp_path / "pairs",
        gallery_size=20,
        gallery_seed=9,
        image_size=64,
        factors=factors,
    )
    names = [model.name for model in results.models]
    assert names == ["holistic (trunk)", "tiny"]
    holistic, tiny = results.models
    assert holistic.delta == pytest.approx(0.0, abs=1e-12)  # attribute-blind
    assert set(tiny.retrieval) == set(factors)
    for factor in factors:
        for scores in (holistic.retrieval[factor], tiny.retrieval[factor], results.chance[factor]):
            assert 0.0 <= scores.map_at_k <= 1.0 and 0.0 <= scores.precision_at_k <= 1.0
    assert results.attribute_texts["color"] == FACTORS["color"].paraphrases[0]
    markdown = write_markdown(results, tmp_path / "eval.md").read_text()
    assert "| holistic (trunk)" in markdown and "| tiny |" in markdown and "mAP@10" in markdown
    assert markdown.count("\n| ") >= len(factors) + 3
    # Lighting's parts get rows of their own, after the mean, which leaves them out.
    parts = ["lighting: direction", "lighting: tint", "lighting: level"]
    assert list(tiny.part_retrieval) == parts and list(results.part_chance) == parts
    assert "| *lighting: tint* (part, same text) |" in markdown
    assert markdown.index("**mean**") < markdown.index("*lighting: direction*")
    mean_row = next(line for line in markdown.splitlines() if line.startswith("| **mean**"))
    expected = np.mean([tiny.retrieval[f].map_at_k for f in factors])
    assert mean_row.split(" | ")[-1].startswith(f"{expected:.3f}")


def test_holistic_embedder_ignores_the_attribute():
    gallery = make_gallery(2, seed=1, image_size=64)
    pooled = HolisticTrunkEmbedder(image_size=64).embed_grid(gallery.images, ["lighting", "pose"])
    assert pooled.shape == (2, 2, 1280)
    assert torch.equal(pooled[:, 0], pooled[:, 1])
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(2, 2))


def test_factor_parts_split_composite_values():
    from training.data.procedural import factor_parts

    assert factor_parts("lighting", "top-left/warm/dim") == {"direction": "top-left", "tint": "warm", "level": "dim"}
    assert factor_parts("layout", "small-bottom-right") == {"scale": "small", "position": "bottom-right"}
    assert factor_parts("pose", "rot030-mirrored") == {"rotation": "rot030", "mirrored": "yes"}
    assert factor_parts("pose", "rot180") == {"rotation": "rot180", "mirrored": "no"}
    assert factor_parts("color", "red") == {}
    for name in ("lighting", "layout", "pose"):  # every value of each composite factor splits
        assert all(factor_parts(name, value) for value in FACTORS[name].choices(None))
