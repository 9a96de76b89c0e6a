"""Training from the feature cache equals training through the trunk; a changed trunk version misses the cache."""

from __future__ import annotations

import json

import pytest
import torch

from encoder import AttributeEncoder
from encoder.testing import tiny_compact_config
from training.data.procedural import ProceduralConfig, generate_dataset
from training.feature_cache import FeatureCache
from training.trainer import ENCODER_DIR, TRAIN_LOG_NAME, train


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("pairs")
    generate_dataset(directory, 8, seed=11, config=ProceduralConfig(size=64))
    return directory


def _config(pairs_dir, output_dir, **overrides) -> dict:
    encoder = tiny_compact_config(image_size=64, image_levels=["head", "stage2"], floor=True).to_dict()
    values = dict(
        data_dir=str(pairs_dir),
        output_dir=str(output_dir),
        encoder=encoder,
        lambda_gen=0.0,
        lambda_con=1.0,
        lambda_factor=1.0,
        steps=3,
        batch_size=4,
        lr=1e-3,
        checkpoint_every=3,
        log_every=1,
        device="cpu",
        progress=False,
        seed=3,
    )
    values.update(overrides)
    return values


def _losses(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / TRAIN_LOG_NAME).read_text().splitlines()]


def test_training_from_the_cache_gives_the_same_losses(tmp_path, pairs_dir):
    plain = train(_config(pairs_dir, tmp_path / "plain"))
    cached = train(_config(pairs_dir, tmp_path / "cached", feature_cache=str(tmp_path / "cache")))
    for a, b in zip(_losses(tmp_path / "plain"), _losses(tmp_path / "cached"), strict=True):
        for name in ("l_con", "l_factor"):
            assert b[name] == pytest.approx(a[name], rel=1e-2, abs=1e-3), (name, a, b)
    # The trained weights agree too (fp16 features move them only slightly).
    one = AttributeEncoder.from_pretrained(plain / ENCODER_DIR).trainable_state_dict()
    two = AttributeEncoder.from_pretrained(cached / ENCODER_DIR).trainable_state_dict()
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-2


def test_cache_rows_match_the_trunk_and_a_new_trunk_version_misses(tmp_path, pairs_dir):
    images = sorted(p for p in pairs_dir.rglob("*.png"))[:3]
    encoder = AttributeEncoder(tiny_compact_config(image_size=64, floor=True)).eval()
    cache = FeatureCache(tmp_path, encoder.backbone)
    assert cache.fill(images) == 3 and cache.fill(images) == 0 and len(cache) == 3
    from PIL import Image

    direct = encoder.backbone.trunk_features([Image.open(p).convert("RGB") for p in images])
    stored = cache.trunk_features(images)
    assert stored.extra is None and stored.descriptors.shape == direct.descriptors.shape
    for name in ("head", "descriptors"):
        a, b = getattr(direct, name), getattr(stored, name)
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-2)
    # Another image size (or levels, floor, trunk weights) is another trunk version: an empty cache there.
    other = AttributeEncoder(tiny_compact_config(image_size=96, floor=True)).eval()
    assert other.backbone.trunk_version() != encoder.backbone.trunk_version()
    moved = FeatureCache(tmp_path, other.backbone)
    assert len(moved) == 0
    with pytest.raises(KeyError, match="not in the feature cache"):
        moved.trunk_features(images[:1])


def test_grow_floor_adds_the_floor_to_a_trained_encoder(tmp_path, pairs_dir):
    base = AttributeEncoder(tiny_compact_config(image_size=64))
    base.save_pretrained(tmp_path / "base")
    config = _config(pairs_dir, tmp_path / "grown", encoder={}, init_encoder=str(tmp_path / "base"), grow_floor=True)
    config["steps"] = 1
    checkpoint = train(config)
    grown = AttributeEncoder.from_pretrained(checkpoint / ENCODER_DIR)
    assert grown.config.floor and "floor" in grown.backbone.trainable_modules()
    with pytest.raises(ValueError, match="grow_floor"):
        train(_config(pairs_dir, tmp_path / "x", grow_floor=True))


def test_factor_sample_reads_k_factors_per_step(pairs_dir):
    import random

    from training.config import TrainConfig
    from training.data.pairs import PairDataset, load_pairs
    from training.trainer import AttributeTrainingModule

    config = TrainConfig.from_dict(_config(pairs_dir, pairs_dir / "unused", factor_sample=2))
    encoder = AttributeEncoder(tiny_compact_config(image_size=64)).eval()
    module = AttributeTrainingModule(config, encoder)
    dataset = PairDataset(pairs_dir, load_pairs(pairs_dir, verify_images=False).records)
    batch = [dataset[i] for i in range(4)]
    seen = []
    grid = encoder.backbone.encode_grid
    encoder.backbone.encode_grid = lambda images, phrases, tokens=None: (
        seen.append(phrases) or grid(images, phrases, tokens)
    )
    with torch.no_grad():
        loss = module.factor_loss(
            batch,
            random.Random(0),
            encoder.backbone.image_features([s.image_x for s in batch] + [s.image_y for s in batch]),
        )
    assert torch.isfinite(loss) and len(seen) == 1 and len(seen[0]) == 2
