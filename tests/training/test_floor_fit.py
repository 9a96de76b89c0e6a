"""The floor fit (training/floor_fit.py): only the floor trains, the tokens stay, it resumes, the gate weighs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from encoder import AttributeEncoder
from encoder.testing import tiny_compact_config
from training.data.procedural import ProceduralConfig, generate_dataset
from training.floor_fit import ENCODER_DIR, FIXED_GROUPS, LOG_NAME, STATE_NAME, FloorFitConfig, fit


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("pairs")
    generate_dataset(directory, 24, seed=5, config=ProceduralConfig(size=64))
    return directory


@pytest.fixture(scope="module")
def trained_encoder(tmp_path_factory):
    """A compact encoder without the floor, as a trained starter is saved."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("encoder")
    AttributeEncoder(tiny_compact_config(image_size=64)).save_pretrained(directory)
    return directory


def _config(trained_encoder, pairs_dir, tmp_path, out: str, **overrides) -> FloorFitConfig:
    values = dict(
        encoder=str(trained_encoder),
        data=[str(pairs_dir)],
        cache=str(tmp_path / "cache"),
        out=str(tmp_path / out),
        steps=12,
        batch_pairs=8,
        lr=1e-2,
        checkpoint_every=3,
        log_every=1,
        threads=1,
    )
    values.update(overrides)
    return FloorFitConfig(**values)


@pytest.mark.slow
def test_fit_trains_only_the_floor_and_keeps_the_tokens(trained_encoder, pairs_dir, tmp_path):
    saved = fit(_config(trained_encoder, pairs_dir, tmp_path, "fit"))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "fit" / LOG_NAME).read_text().splitlines()]
    assert len(losses) == 12
    assert sum(losses[-3:]) < sum(losses[:3])  # the floor learns on its 24 pairs
    before = AttributeEncoder.from_pretrained(trained_encoder).eval()
    after = AttributeEncoder.from_pretrained(saved).eval()
    assert after.config.floor and after.config.floor_gate_connector
    assert after.version != before.version
    old, new = before.trainable_state_dict(), after.trainable_state_dict()
    assert all(torch.equal(old[name], new[name]) for name in old)  # connector, projector, LoRA untouched
    images = sorted(str(p) for p in (pairs_dir / "images").rglob("*.png"))[:3]
    with torch.no_grad():
        plain = before.encode_grid(images, ["lighting", "art style"])
        floored = after.encode_grid(images, ["lighting", "art style"])
    assert torch.equal(plain.tokens, floored.tokens)  # what conditions the generator is unchanged
    assert not torch.allclose(plain.pooled, floored.pooled)  # the search vector now holds the floor
    assert torch.allclose(floored.pooled.norm(dim=-1), torch.ones(3, 2), atol=1e-5)
    # The fixed groups project onto principal directions (orthonormal rows), the centre is the data's mean.
    floor = after.backbone.floor
    for name in FIXED_GROUPS:
        weight = floor.projections[name].weight.double()
        assert torch.allclose(weight @ weight.t(), torch.eye(len(weight), dtype=torch.float64), atol=1e-4)
    assert float(floor.center.abs().sum()) > 0


@pytest.mark.slow
def test_a_stopped_fit_continues_to_the_same_weights(trained_encoder, pairs_dir, tmp_path):
    whole = fit(_config(trained_encoder, pairs_dir, tmp_path, "whole"))
    assert fit(_config(trained_encoder, pairs_dir, tmp_path, "parts", stop_at=5)) is None
    assert torch.load(tmp_path / "parts" / STATE_NAME, weights_only=True)["step"] == 5
    continued = fit(_config(trained_encoder, pairs_dir, tmp_path, "parts"))
    one = AttributeEncoder.from_pretrained(whole).trainable_state_dict()
    two = AttributeEncoder.from_pretrained(continued).trainable_state_dict()
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-6), name
    assert (tmp_path / "parts" / ENCODER_DIR).is_dir()


def test_the_connector_gate_weighs_the_connector_against_the_descriptors(trained_encoder):
    encoder = AttributeEncoder.from_pretrained(trained_encoder).eval()
    images = [(torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy() for _ in range(2)]
    with torch.no_grad():
        plain = encoder.encode_grid(images, ["lighting"]).pooled
        encoder.backbone.add_floor(gate_connector=True)
        gate = encoder.backbone.floor.gate
        gate.weight.zero_()
        gate.bias.copy_(torch.tensor([-30.0, -30.0, -30.0, -30.0, 30.0]))  # all weight on the connector
        connector_only = encoder.encode_grid(images, ["lighting"]).pooled
        gate.bias.copy_(torch.tensor([-30.0, -30.0, -30.0, 30.0, -30.0]))  # all on the lighting descriptors
        lighting_only = encoder.encode_grid(images, ["lighting"]).pooled
        features = encoder.backbone.image_features(images)
        groups = encoder.backbone.floor.group_vectors(features.descriptors)  # (2, G, d)
    assert torch.allclose(connector_only, F.normalize(plain, dim=-1), atol=1e-5)
    assert torch.allclose(lighting_only[:, 0], groups[:, 3], atol=1e-5)


def test_the_connector_gate_needs_the_floor():
    with pytest.raises(ValueError, match="floor_gate_connector"):
        tiny_compact_config(floor_gate_connector=True)
