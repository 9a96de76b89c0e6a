"""The shipped starter generator (models/starter/generator) against the shipped starter encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from encoder import AttributeEncoder
from generator_plugin.plugins import load_generator

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "models" / "starter" / "generator"
ENCODER = ROOT / "models" / "starter" / "encoder"


def test_the_adapter_was_trained_on_the_shipped_encoder():
    """Retraining the encoder changes its tokens and pooled vector: the adapter must be retrained or re-checked."""
    record = json.loads((GENERATOR / "attribute_adapter" / "adapter_train_record.json").read_text())
    encoder = AttributeEncoder.from_pretrained(ENCODER)
    assert record["encoder_version"] == encoder.version, (
        f"models/starter/generator's adapter was trained on encoder {record['encoder_version']}, the shipped encoder "
        f"is {encoder.version}: retrain the adapter (configs/train-starter-generator-real.sh, adapter stage) and "
        "re-measure it with bench/transfer_score.py"
    )


@pytest.mark.slow
def test_apply_to_my_image_at_the_shipped_size_moves_towards_the_reference_colour():
    pipeline = load_generator("flux", GENERATOR)
    pipeline.set_progress_bar_config(disable=True)
    encoder = AttributeEncoder.from_pretrained(ENCODER).eval()
    assert pipeline.default_image_size == 128 and pipeline.attribute_adapter.config.weight_gain == 3.0
    y, x = np.mgrid[0:128, 0:128] / 128
    base = PIL.Image.fromarray((np.stack([0.3 + 0.4 * x, 0.5 + 0.2 * y, 0.4 + 0.1 * x * y], -1) * 255).astype(np.uint8))
    reference = PIL.Image.new("RGB", (128, 128), (20, 40, 200))  # a deep blue palette
    common = dict(prompt="", image=base, strength=0.7, num_inference_steps=20, output_type="np")
    with torch.no_grad():
        control = pipeline(**common, generator=torch.Generator().manual_seed(0)).images[0]  # (H, W, 3)
        output = pipeline.personalize(
            refs=[(reference, "color palette")], attribute_encoder=encoder, generator=torch.Generator().manual_seed(0),
            **common,
        ).images[0]  # fmt: skip
    assert output.shape == (128, 128, 3)
    assert blue_minus_red(output) > blue_minus_red(control) + 0.05, (blue_minus_red(output), blue_minus_red(control))


def blue_minus_red(image: np.ndarray) -> float:
    """Mean blue minus mean red of an (H, W, 3) image in [0, 1]."""
    return float(image[..., 2].mean() - image[..., 0].mean())
