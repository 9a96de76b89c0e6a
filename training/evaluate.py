"""Evaluation harness: Delta(pos, neg) on held-out pairs, per-factor retrieval (architecture.md, "Training").

- Delta(pos, neg) = mean over held-out pairs of [mean over the pair's positive phrases a of
                  cos(pooled E(x, a), pooled E(y, a)) - the same mean over its negative phrases].
- Retrieval, per factor f, on a gallery rendered from unseen seeds (optionally with unseen factor combinations):
  every gallery image is a query against all the others; relevant = the images with the same value of f
  (from the recorded factors); the ranking is by cos of pooled embeddings under f's attribute text (one of
  the factor's paraphrases). mAP@k and P@k are averaged over the queries that have at least one relevant image.
- Ties are scored exactly in expectation over a random order of the tied items (McSherry & Najork, ECIR 2008),
  so a constant embedding gives exactly the chance level instead of a value that depends on index order.

    AP@k = 1/min(R, k) * sum_{i <= k} rel_i * P@i        (R: relevant images for this query)
    P@k  = 1/min(k, n) * sum_{i <= k} rel_i              (n: gallery images other than the query)

Baselines: a holistic embedder (the frozen EfficientNet-Lite0 trunk's globally pooled 1280-d features, no
attribute: the same vector for every factor) and any other encoder, e.g. one trained without L_con.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from encoder import AttributeEncoder
from encoder.efficientnet_lite import PIXEL_MEAN, PIXEL_STD, load_efficientnet_lite0
from encoder.images import to_pixels
from training.data.pairs import PairRecord, load_pairs
from training.data.procedural import (
    FACTORS,
    check_factor_names,
    factor_parts,
    parse_hold_out,
    render_image,
    sample_factors,
)

DEFAULT_K = 10


# ---------------------------------------------------------------------------------------------------------
# Metrics (pure numpy, exact)


@dataclass(frozen=True)
class RetrievalScores:
    """mAP@k and P@k of one factor, averaged over `num_queries` queries that had a relevant image."""

    map_at_k: float
    precision_at_k: float
    num_queries: int


def ranked_metrics(scores: np.ndarray, relevant: np.ndarray, k: int = DEFAULT_K) -> tuple[float, float]:
    """(AP@k, P@k) of one query: scores (n,) of the candidates, relevant (n,) bool; ties scored in expectation.

    Raises ValueError when no candidate is relevant (AP is undefined); callers skip such queries.
    """
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    num_relevant = int(relevant.sum())
    if num_relevant == 0:
        raise ValueError("no relevant candidate: AP is undefined for this query")
    depth = min(k, len(scores))
    # Tie groups in descending score order; each rank position 1..depth falls into one group.
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_relevant = scores[order], relevant[order]
    group_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    group_ends = np.r_[group_starts[1:], len(scores)]
    group_of_position = np.repeat(np.arange(len(group_starts)), group_ends - group_starts)[:depth]  # (depth,)
    sizes = (group_ends - group_starts).astype(np.float64)
    hits = np.add.reduceat(sorted_relevant.astype(np.float64), group_starts)  # relevant items per group
    p_one = hits / sizes  # P(a given position of the group holds a relevant item)
    # P(two given distinct positions of the same group both hold relevant items)
    p_two_same = np.where(sizes > 1, hits * (hits - 1) / np.maximum(sizes * (sizes - 1), 1), 0.0)

    expected_rel = p_one[group_of_position]  # E[rel_i], (depth,)
    precision = float(expected_rel.sum() / depth)
    average_precision = 0.0
    for i in range(depth):  # E[rel_i * P@i] = (1/i) sum_{j <= i} E[rel_i rel_j]
        g = group_of_position[i]
        joint = expected_rel[i]  # j = i
        for j in range(i):
            h = group_of_position[j]
            joint += p_two_same[g] if h == g else p_one[g] * p_one[h]
        average_precision += joint / (i + 1)
    return float(average_precision / min(num_relevant, k)), precision


def retrieval_scores(embeddings: np.ndarray, values: Sequence[str], k: int = DEFAULT_K) -> RetrievalScores:
    """Leave-one-out retrieval over a gallery: embeddings (N, d), values[i] the factor value of image i."""
    vectors = np.asarray(embeddings, dtype=np.float64)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    cosines = vectors @ vectors.T  # (N, N)
    labels = np.asarray(values)
    average_precisions, precisions = [], []
    for query in range(len(labels)):
        others = np.arange(len(labels)) != query
        relevant = labels[others] == labels[query]
        if not relevant.any():
            continue
        ap, precision = ranked_metrics(cosines[query, others], relevant, k)
        average_precisions.append(ap)
        precisions.append(precision)
    if not average_precisions:
        return RetrievalScores(float("nan"), float("nan"), 0)
    return RetrievalScores(float(np.mean(average_precisions)), float(np.mean(precisions)), len(precisions))


def delta_pos_neg(pairs: Sequence[tuple[Sequence[float], Sequence[float]]]) -> tuple[float, float, float]:
    """(Delta, mean positive cos, mean negative cos) from each pair's (positive cosines, negative cosines).

    Each pair weighs the same: Delta = mean over pairs of (mean of its positive cosines - mean of its negative
    ones). So an embedding that ignores the attribute has Delta = 0 exactly, whatever the pairs' list lengths;
    weighting every (pair, phrase) item instead would reward a holistic embedding for the fact that pairs with
    many shared factors (many positives, few negatives) look alike. Pairs lacking either list are skipped.
    """
    usable = [(pos, neg) for pos, neg in pairs if len(pos) and len(neg)]
    if not usable:
        raise ValueError("Delta needs at least one pair with both a positive and a negative attribute")
    positive = np.array([np.mean(pos) for pos, _ in usable])
    negative = np.array([np.mean(neg) for _, neg in usable])
    return float(np.mean(positive - negative)), float(positive.mean()), float(negative.mean())


# ---------------------------------------------------------------------------------------------------------
# Embedders


class Embedder(Protocol):
    """What the harness evaluates: images x attributes -> L2-normalised pooled vectors (B, K, d)."""

    def embed_grid(self, images: Sequence[Any], attributes: Sequence[str]) -> torch.Tensor: ...


class EncoderEmbedder:
    """An AttributeEncoder's pooled embeddings, computed in batches without gradients."""

    def __init__(self, encoder: AttributeEncoder, batch_size: int = 32) -> None:
        self.encoder = encoder.eval()
        self.batch_size = batch_size

    def embed_grid(self, images: Sequence[Any], attributes: Sequence[str]) -> torch.Tensor:
        chunks = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                pooled = self.encoder.encode_grid(list(images[start : start + self.batch_size]), list(attributes))
                chunks.append(pooled.pooled.float().cpu())  # (b, K, d)
        return torch.cat(chunks)


class HolisticTrunkEmbedder:
    """The holistic baseline: EfficientNet-Lite0 head features (1280-d), globally average-pooled, no attribute."""

    def __init__(
        self, image_size: int = 224, weights: str | None = None, batch_size: int = 64, device: str = "cpu"
    ) -> None:
        self.trunk = load_efficientnet_lite0(weights).to(device)
        self.device = device
        self.image_size = image_size
        self.batch_size = batch_size

    def embed_grid(self, images: Sequence[Any], attributes: Sequence[str]) -> torch.Tensor:
        chunks = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = images[start : start + self.batch_size]
                pixels = to_pixels(batch, self.image_size, PIXEL_MEAN, PIXEL_STD, device=self.device)
                features = self.trunk.features(pixels).mean(dim=(2, 3))  # (b, 1280)
                chunks.append(torch.nn.functional.normalize(features, dim=-1).cpu())
        pooled = torch.cat(chunks)  # (B, 1280)
        return pooled[:, None, :].expand(-1, len(attributes), -1)  # the same vector under every attribute


# ---------------------------------------------------------------------------------------------------------
# Data


@dataclass
class Gallery:
    """Retrieval gallery: rendered images and the factor values of each."""

    images: list[Image.Image]
    factors: list[dict[str, str]]


def make_gallery(
    size: int,
    seed: int,
    *,
    image_size: int = 128,
    unseen: Sequence[Mapping[str, str]] = (),
    unseen_count: int = 0,
) -> Gallery:
    """`size` procedural images from `seed`; the first `unseen_count` are pinned to the `unseen` combinations.

    Pass the training run's hold-out combinations as `unseen` to put combinations training never saw in the
    gallery. Use a seed that no training or validation run used.
    """
    if unseen_count and not unseen:
        raise ValueError("unseen_count > 0 needs the held-out combinations in `unseen`")
    rng = np.random.default_rng([seed, 7919])  # a stream of its own: not the pair generator's pair_rng(seed, i)
    images, factors = [], []
    for index in range(size):
        fixed = unseen[index % len(unseen)] if index < unseen_count else None
        values = sample_factors(rng, fixed=fixed)
        images.append(render_image(values, size=image_size, jitter_seed=int(rng.integers(2**31 - 1))))
        factors.append(values)
    return Gallery(images=images, factors=factors)


def load_pair_images(directory: str | Path, records: Sequence[PairRecord]) -> list[tuple[Image.Image, Image.Image]]:
    """The (x, y) images of `records` as RGB."""
    root = Path(directory)
    loaded = []
    for record in records:
        with Image.open(root / record.image_x) as x, Image.open(root / record.image_y) as y:
            loaded.append((x.convert("RGB"), y.convert("RGB")))
    return loaded


# ---------------------------------------------------------------------------------------------------------
# The harness


@dataclass
class ModelResults:
    """One model's numbers: Delta over the held-out pairs and retrieval per factor."""

    name: str
    retrieval: dict[str, RetrievalScores]
    # "factor: part" -> retrieval where relevant = the same part of a composite factor (not in the mean)
    part_retrieval: dict[str, RetrievalScores] = field(default_factory=dict)
    delta: float | None = None
    mean_cos_positive: float | None = None
    mean_cos_negative: float | None = None


@dataclass
class EvaluationResults:
    """Everything `evaluate` measured, and how (for the report)."""

    models: list[ModelResults]
    chance: dict[str, RetrievalScores]  # a constant embedding: the expected score of a random ranking
    attribute_texts: dict[str, str]  # factor -> the attribute text the gallery was embedded under
    k: int
    gallery_size: int
    num_pairs: int
    description: str = ""
    part_chance: dict[str, RetrievalScores] = field(default_factory=dict)

    def to_markdown(self) -> str:
        """Markdown tables: retrieval per factor (mAP@k / P@k per model and chance), then Delta."""
        k = self.k
        lines = [f"## Attribute retrieval (mAP@{k} / P@{k}), gallery of {self.gallery_size} images", ""]
        if self.description:
            lines[1:1] = ["", self.description]
        header = ["factor (attribute text)", "chance", *(model.name for model in self.models)]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for factor, text in self.attribute_texts.items():
            cells = [f"{factor} ({text!r})", _pair(self.chance[factor])]
            cells += [_pair(model.retrieval[factor]) for model in self.models]
            lines.append("| " + " | ".join(cells) + " |")
        means = ["**mean**", _pair(_mean_scores(self.chance.values()))]
        means += [_pair(_mean_scores(model.retrieval.values())) for model in self.models]
        lines.append("| " + " | ".join(means) + " |")
        for part, chance in self.part_chance.items():  # after the mean: parts are not factors of their own
            cells = [f"*{part}* (part, same text)", _pair(chance)]
            cells += [_pair(model.part_retrieval[part]) for model in self.models]
            lines.append("| " + " | ".join(cells) + " |")
        if any(model.delta is not None for model in self.models):
            lines += ["", f"## Delta(pos, neg) on {self.num_pairs} held-out pairs", ""]
            lines += ["| model | mean cos, positive | mean cos, negative | Delta |", "|---|---|---|---|"]
            for model in self.models:
                if model.delta is not None:
                    lines.append(
                        f"| {model.name} | {model.mean_cos_positive:.3f} | {model.mean_cos_negative:.3f} | "
                        f"{model.delta:.3f} |"
                    )
        return "\n".join(lines) + "\n"


def _pair(scores: RetrievalScores) -> str:
    return f"{scores.map_at_k:.3f} / {scores.precision_at_k:.3f}"


def _mean_scores(scores: Any) -> RetrievalScores:
    scores = list(scores)
    return RetrievalScores(
        float(np.mean([s.map_at_k for s in scores])),
        float(np.mean([s.precision_at_k for s in scores])),
        sum(s.num_queries for s in scores),
    )


def write_markdown(results: EvaluationResults, path: str | Path) -> Path:
    """Write `results.to_markdown()` to `path` and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(results.to_markdown())
    return path


def as_embedder(model: Embedder | AttributeEncoder | str | Path, batch_size: int = 32, device: str = "cpu") -> Embedder:
    """An Embedder from itself, an AttributeEncoder, an encoder directory or a training checkpoint directory."""
    if isinstance(model, AttributeEncoder):
        return EncoderEmbedder(model.to(device), batch_size)
    if isinstance(model, str | Path):
        path = Path(model)
        if (path / "encoder").is_dir():  # a training checkpoint: its encoder/ subfolder
            path = path / "encoder"
        return EncoderEmbedder(AttributeEncoder.from_pretrained(path, device=device), batch_size)
    return model


def pair_cosines(
    embedder: Embedder, records: Sequence[PairRecord], images: Sequence[tuple[Any, Any]]
) -> list[tuple[list[float], list[float]]]:
    """Per pair: cos(E(x, a), E(y, a)) for each of its positive phrases, and for each of its negative ones."""
    per_pair = []
    for record, (image_x, image_y) in zip(records, images, strict=True):
        phrases = [*record.positive, *record.negative]
        pooled = embedder.embed_grid([image_x, image_y], phrases).double()  # (2, K, d)
        cosines = torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=-1).tolist()  # (K,)
        per_pair.append((cosines[: len(record.positive)], cosines[len(record.positive) :]))
    return per_pair


def evaluate(
    models: Mapping[str, Embedder | AttributeEncoder | str | Path],
    *,
    pairs_dir: str | Path | None = None,
    gallery: Gallery | None = None,
    gallery_size: int = 200,
    gallery_seed: int = 1_000_003,
    image_size: int = 128,
    unseen: Sequence[Mapping[str, str]] = (),
    unseen_count: int = 0,
    factors: Sequence[str] | None = None,
    paraphrase: int = 0,
    k: int = DEFAULT_K,
    max_pairs: int | None = None,
    holistic: bool = True,
    holistic_image_size: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
) -> EvaluationResults:
    """Delta on held-out pairs (when `pairs_dir` is given) and per-factor retrieval for each model.

    `models` maps a row name to an encoder, an Embedder, or a checkpoint path. `holistic` adds the trunk
    baseline as the first row, at `holistic_image_size` (default `image_size`). The gallery is `gallery`, or
    one rendered by `make_gallery(gallery_size, gallery_seed, ...)`.
    """
    factors = list(factors or FACTORS)
    check_factor_names(factors)
    attribute_texts = {f: FACTORS[f].paraphrases[paraphrase % len(FACTORS[f].paraphrases)] for f in factors}
    if gallery is None:
        gallery = make_gallery(
            gallery_size, gallery_seed, image_size=image_size, unseen=unseen, unseen_count=unseen_count
        )
    rows: dict[str, Embedder] = {}
    if holistic:
        rows["holistic (trunk)"] = HolisticTrunkEmbedder(holistic_image_size or image_size, device=device)
    rows.update({name: as_embedder(model, batch_size, device) for name, model in models.items()})

    records: list[PairRecord] = []
    pair_images: list[tuple[Any, Any]] = []
    if pairs_dir is not None:
        records = load_pairs(pairs_dir, verify_images=False).records[:max_pairs]
        pair_images = load_pair_images(pairs_dir, records)

    results = []
    texts = list(attribute_texts.values())
    part_labels = {  # (factor, part) -> that part's value per gallery image, for composite factors
        (factor, part): labels for factor in factors for part, labels in _part_labels(gallery.factors, factor).items()
    }
    for name, embedder in rows.items():
        pooled = embedder.embed_grid(gallery.images, texts).double().numpy()  # (N, F, d)
        retrieval = {
            factor: retrieval_scores(pooled[:, column], [values[factor] for values in gallery.factors], k)
            for column, factor in enumerate(factors)
        }
        part_retrieval = {
            f"{factor}: {part}": retrieval_scores(pooled[:, factors.index(factor)], labels, k)
            for (factor, part), labels in part_labels.items()
        }
        model = ModelResults(name=name, retrieval=retrieval, part_retrieval=part_retrieval)
        if records:
            model.delta, model.mean_cos_positive, model.mean_cos_negative = delta_pos_neg(
                pair_cosines(embedder, records, pair_images)
            )
        results.append(model)
    constant = np.ones((len(gallery.images), 1))
    chance = {
        factor: retrieval_scores(constant, [values[factor] for values in gallery.factors], k) for factor in factors
    }
    part_chance = {
        f"{factor}: {part}": retrieval_scores(constant, labels, k) for (factor, part), labels in part_labels.items()
    }
    description = (
        f"Gallery: {len(gallery.images)} procedural images ({unseen_count} pinned to unseen combinations "
        f"{list(map(dict, unseen))}); leave-one-out queries; relevant = same factor value; ties scored in "
        "expectation. Each cell: mAP / P. Rows in italics score one part of a composite factor (relevant = "
        "the same part) with the factor's embeddings; the mean leaves them out."
    )
    return EvaluationResults(
        models=results,
        chance=chance,
        attribute_texts=attribute_texts,
        k=k,
        gallery_size=len(gallery.images),
        num_pairs=len(records),
        description=description,
        part_chance=part_chance,
    )


def _part_labels(gallery_factors: Sequence[Mapping[str, str]], factor: str) -> dict[str, list[str]]:
    """Part -> its value per gallery image, for a composite factor (lighting, layout, pose); else empty."""
    parts = [factor_parts(factor, values[factor]) for values in gallery_factors]
    return {part: [p[part] for p in parts] for part in (parts[0] if parts else {})}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m training.evaluate --model NAME=CHECKPOINT ... --out eval.md`."""
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="encoder or checkpoint")
    parser.add_argument(
        "--untrained", metavar="NAME=TRAIN_CONFIG", help="also evaluate the freshly initialised encoder of a config"
    )
    parser.add_argument("--pairs", type=Path, help="held-out pair dataset for Delta")
    parser.add_argument("--max-pairs", type=int)
    parser.add_argument("--gallery-size", type=int, default=200)
    parser.add_argument("--gallery-seed", type=int, default=1_000_003)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--hold-out", action="append", default=[], metavar="FACTOR=VALUE[,...]")
    parser.add_argument("--unseen-count", type=int, default=0, help="gallery images pinned to the hold-outs")
    parser.add_argument("--paraphrase", type=int, default=0, help="which paraphrase names each factor")
    parser.add_argument("--k", type=int, default=DEFAULT_K)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", default="cpu", help="torch device for the models, e.g. cuda")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models: dict[str, Any] = {}
    if args.untrained:
        from training.config import load_train_config
        from training.trainer import build_encoder

        name, _, config_path = args.untrained.partition("=")
        models[name] = build_encoder(load_train_config(config_path), None)
    for item in args.model:
        name, _, path = item.partition("=")
        models[name] = path
    results = evaluate(
        models,
        pairs_dir=args.pairs,
        gallery_size=args.gallery_size,
        gallery_seed=args.gallery_seed,
        image_size=args.image_size,
        unseen=[parse_hold_out(text) for text in args.hold_out],
        unseen_count=args.unseen_count,
        paraphrase=args.paraphrase,
        k=args.k,
        max_pairs=args.max_pairs,
        device=args.device,
    )
    write_markdown(results, args.out)
    print(results.to_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
