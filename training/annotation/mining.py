"""Pair mining: propose semantically linked image pairs for the annotator from a collection of images.

Every image gets the holistic embedding of the evaluation harness (the frozen EfficientNet-Lite0 trunk's
globally pooled 1280-d features, L2-normalised: `training.evaluate.HolisticTrunkEmbedder`). Each image is
paired with up to `neighbours` of its nearest neighbours whose cosine similarity lies in the band
[low, high]: below `low` the two images rarely share anything worth naming, above `high` they are near
duplicates that differ in nothing. Byte-identical files are paired with nothing. Unordered pairs are
de-duplicated; with `max_pairs` the most similar pairs are kept.

Output: a JSONL file of {"id", "image_x", "image_y", "similarity"} with absolute paths, the input of
`annotate label`. The band depends on the image domain: the run prints the quantiles of every image's
nearest-neighbour similarity to choose it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from encoder.images import load_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def collect_image_paths(directory: str | Path | None = None, *, list_file: str | Path | None = None) -> list[Path]:
    """Image files under a directory (recursive, by suffix) and/or listed in a file (one path a line)."""
    if directory is None and list_file is None:
        raise ValueError("give a directory of images or --paths FILE")
    paths: list[Path] = []
    if directory is not None:
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory} is not a directory")
        paths += sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if list_file is not None:
        list_file = Path(list_file)
        lines = list_file.read_text(encoding="utf-8").splitlines()
        paths += [list_file.parent / line.strip() for line in lines if line.strip()]
    unique = dict.fromkeys(path.absolute() for path in paths)
    return list(unique)


@dataclass(frozen=True)
class MinedPair:
    """Two images proposed as a pair, with their holistic cosine similarity."""

    image_x: Path
    image_y: Path
    similarity: float

    @property
    def id(self) -> str:
        digest = hashlib.sha1(f"{self.image_x}\n{self.image_y}".encode()).hexdigest()
        return f"mined-{digest[:16]}"


@dataclass
class MiningResult:
    """The pairs, how many images were embedded, the unreadable ones, and nearest-neighbour statistics."""

    pairs: list[MinedPair]
    images: int
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    duplicates: int = 0
    nearest_quantiles: dict[str, float] = field(default_factory=dict)
    band: tuple[float, float] = (0.0, 1.0)

    def text(self) -> str:
        """A few lines for the terminal."""
        quantiles = ", ".join(f"{name} {value:.3f}" for name, value in self.nearest_quantiles.items())
        lines = [
            f"{self.images} images embedded, {len(self.unreadable)} unreadable, {self.duplicates} byte-identical",
            f"nearest-neighbour cosine quantiles: {quantiles}",
            f"{len(self.pairs)} pairs in the band [{self.band[0]}, {self.band[1]}]",
        ]
        lines += [f"  unreadable: {path} ({reason})" for path, reason in self.unreadable[:5]]
        return "\n".join(lines)


def holistic_embeddings(
    paths: Sequence[Path], *, image_size: int = 224, batch_size: int = 32, progress: bool = False
) -> tuple[list[Path], np.ndarray, list[tuple[Path, str]], list[str]]:
    """(readable paths, embeddings (N, 1280) L2-normalised, unreadable (path, reason), sha256 per kept path)."""
    from tqdm import tqdm

    from training.evaluate import HolisticTrunkEmbedder

    embedder = HolisticTrunkEmbedder(image_size=image_size, batch_size=batch_size)
    kept: list[Path] = []
    digests: list[str] = []
    unreadable: list[tuple[Path, str]] = []
    chunks: list[np.ndarray] = []
    bar = tqdm(total=len(paths), unit="image", disable=not progress, file=sys.stderr)
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start : start + batch_size]:
            try:
                data = path.read_bytes()
                images.append(load_rgb(path))
            except Exception as error:  # noqa: BLE001 - any failure means "skip this image", reported
                unreadable.append((path, f"{error.__class__.__name__}: {error}"))
                continue
            kept.append(path)
            digests.append(hashlib.sha256(data).hexdigest())
        if images:
            with torch.no_grad():
                pooled = embedder.embed_grid(images, ["holistic"])[:, 0]  # (b, 1280), unit length
            chunks.append(pooled.float().numpy())
        bar.update(min(batch_size, len(paths) - start))
    bar.close()
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, 1280), dtype=np.float32)
    return kept, embeddings, unreadable, digests


def band_neighbours(
    embeddings: np.ndarray,
    *,
    low: float,
    high: float,
    neighbours: int,
    groups: Sequence[str] | None = None,
    block: int = 1024,
) -> tuple[list[tuple[int, int, float]], np.ndarray]:
    """Unordered (i, j, cos) pairs: each row's top `neighbours` inside [low, high], never within one group.

    Also returns each row's nearest-neighbour similarity (outside its group). Memory is block x N.
    """
    count = embeddings.shape[0]
    group_ids = np.unique(np.asarray(groups), return_inverse=True)[1] if groups is not None else np.arange(count)
    found: dict[tuple[int, int], float] = {}
    nearest = np.full(count, -1.0, dtype=np.float32)
    for start in range(0, count, block):
        similarity = embeddings[start : start + block] @ embeddings.T  # (b, N) cosine: rows are unit vectors
        rows = np.arange(start, min(start + block, count))
        same = group_ids[rows][:, None] == group_ids[None, :]  # self and byte-identical copies
        similarity = np.where(same, -np.inf, similarity)
        nearest[rows] = similarity.max(axis=1) if count > 1 else -1.0
        in_band = np.where((similarity >= low) & (similarity <= high), similarity, -np.inf)
        k = min(neighbours, count - 1)
        if k < 1:
            continue
        top = np.argpartition(-in_band, k - 1, axis=1)[:, :k]
        for offset, row in enumerate(rows):
            for column in top[offset]:
                value = in_band[offset, column]
                if np.isfinite(value):
                    found[(min(row, column), max(row, column))] = float(value)
    return [(i, j, value) for (i, j), value in sorted(found.items())], nearest


def mine_pairs(
    paths: Sequence[Path],
    *,
    low: float = 0.55,
    high: float = 0.95,
    neighbours: int = 3,
    max_pairs: int | None = None,
    image_size: int = 224,
    progress: bool = False,
) -> MiningResult:
    """Embed the images holistically and propose band-limited nearest-neighbour pairs (see the module doc)."""
    if not -1.0 <= low <= high <= 1.0:
        raise ValueError(f"the band must satisfy -1 <= low <= high <= 1, got [{low}, {high}]")
    if neighbours < 1:
        raise ValueError("neighbours must be at least 1")
    kept, embeddings, unreadable, digests = holistic_embeddings(paths, image_size=image_size, progress=progress)
    triples, nearest = band_neighbours(embeddings, low=low, high=high, neighbours=neighbours, groups=digests)
    if max_pairs is not None:
        triples = sorted(sorted(triples, key=lambda item: -item[2])[:max_pairs])
    pairs = [MinedPair(kept[i], kept[j], round(value, 4)) for i, j, value in triples]
    valid = nearest[nearest > -1.0]
    quantiles = (
        {name: float(np.quantile(valid, q)) for name, q in (("min", 0.0), ("p10", 0.1), ("p50", 0.5), ("p90", 0.9))}
        if valid.size
        else {}
    )
    return MiningResult(
        pairs=pairs,
        images=len(kept),
        unreadable=unreadable,
        duplicates=len(digests) - len(set(digests)),
        nearest_quantiles=quantiles,
        band=(low, high),
    )


def write_mined_pairs(path: str | Path, pairs: Sequence[MinedPair]) -> Path:
    """Write the pairs as the JSONL input of `annotate label` (replaces the file atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        for pair in pairs:
            row = {"id": pair.id, "image_x": str(pair.image_x), "image_y": str(pair.image_y)}
            handle.write(json.dumps({**row, "similarity": pair.similarity}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path
