"""Pair mining: band-limited nearest neighbours of the holistic trunk embedding (the real EfficientNet-Lite0)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from training.annotation.label import read_pair_tasks
from training.annotation.mining import band_neighbours, collect_image_paths, mine_pairs, write_mined_pairs
from training.data.procedural import ProceduralConfig, generate_dataset


def _unit(*rows):
    array = np.array(rows, dtype=np.float32)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def test_band_neighbours_keeps_pairs_inside_the_band_only():
    angles = np.deg2rad([0, 10, 40, 90])  # cos(10) = 0.985, cos(30) = 0.866, cos(40) = 0.766, cos(50) = 0.643
    embeddings = _unit(*[(np.cos(a), np.sin(a)) for a in angles])
    pairs, nearest = band_neighbours(embeddings, low=0.6, high=0.95, neighbours=2)
    assert [(i, j) for i, j, _ in pairs] == [(0, 2), (1, 2), (2, 3)]  # (0, 1) is a near-duplicate; 0-3 too far
    assert pairs[1][2] == pytest.approx(np.cos(np.deg2rad(30)), abs=1e-5)
    assert nearest[0] == pytest.approx(np.cos(np.deg2rad(10)), abs=1e-5)

    one, _ = band_neighbours(embeddings, low=0.6, high=0.95, neighbours=1)
    assert [(i, j) for i, j, _ in one] == [(0, 2), (1, 2), (2, 3)]  # 2's best is 1; 0's and 3's best is 2

    grouped, _ = band_neighbours(embeddings, low=0.6, high=0.95, neighbours=2, groups=["a", "b", "b", "c"])
    assert [(i, j) for i, j, _ in grouped] == [(0, 2), (2, 3)]  # 1 and 2 are the same file


@pytest.mark.slow
def test_mine_pairs_from_a_directory_skips_unreadable_and_identical_files(tmp_path):
    torch.set_num_threads(1)
    generate_dataset(tmp_path / "proc", 6, seed=5, config=ProceduralConfig(size=64))
    images = tmp_path / "images"
    shutil.copytree(tmp_path / "proc" / "images", images)
    first = sorted(images.rglob("*.png"))[0]
    shutil.copy(first, images / "copy_of_first.png")
    (images / "broken.jpg").write_bytes(b"not an image")
    paths = collect_image_paths(images)
    assert len(paths) == 14

    result = mine_pairs(paths, low=0.0, high=0.999, neighbours=2, image_size=64)
    assert result.images == 13 and [path.name for path, _ in result.unreadable] == ["broken.jpg"]
    assert result.duplicates == 1
    names = {(pair.image_x.name, pair.image_y.name) for pair in result.pairs}
    assert ("0000000_x.png", "copy_of_first.png") not in names and ("copy_of_first.png", "0000000_x.png") not in names
    assert len(result.pairs) >= 13 // 2 and all(0.0 <= pair.similarity <= 0.999 for pair in result.pairs)
    assert set(result.nearest_quantiles) == {"min", "p10", "p50", "p90"}

    capped = mine_pairs(paths, low=0.0, high=0.999, neighbours=2, image_size=64, max_pairs=3)
    top = sorted((pair.similarity for pair in result.pairs), reverse=True)[:3]
    assert sorted(pair.similarity for pair in capped.pairs) == sorted(top)

    out = write_mined_pairs(tmp_path / "mined.jsonl", result.pairs)
    tasks, bad = read_pair_tasks(out)  # the input format of `annotate label`
    assert bad == [] and len(tasks) == len(result.pairs)
    assert tasks[0].id.startswith("mined-") and "similarity" in tasks[0].info
    assert json.loads(out.read_text().splitlines()[0])["image_x"].startswith(str(images))

    listed = tmp_path / "list.txt"
    listed.write_text(f"{first}\nimages/{first.relative_to(images)}\n")
    assert collect_image_paths(list_file=listed) == [first.absolute()]
