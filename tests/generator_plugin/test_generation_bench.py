"""bench/generation.py --generator: apply-to-my-image timed end to end on a saved generator and encoder."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _load_generation_bench():
    spec = importlib.util.spec_from_file_location("generation_bench", ROOT / "bench" / "generation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["generation_bench"] = module
    spec.loader.exec_module(module)
    return module


def test_apply_to_my_image_rows_on_a_saved_generator_with_a_pooled_token_adapter(tmp_path, capsys):
    from encoder import AttributeEncoder
    from encoder.testing import tiny_compact_config
    from generator_plugin import AttributePipeline
    from generator_plugin.adapter import AttributeAdapter
    from generator_plugin.testing import randomize_attribute_adapter, tiny_generator, tiny_text_encoders

    generator_dir, encoder_dir = tmp_path / "generator", tmp_path / "encoder"
    base = tiny_generator(seed=0, token_dim=None)
    AttributePipeline(base.transformer, base.vae, base.scheduler, **tiny_text_encoders(seed=0)).save_pretrained(
        generator_dir
    )
    adapter = AttributeAdapter.for_transformer(base.transformer, token_dim=32, pooled_token=True)
    randomize_attribute_adapter(adapter).save_pretrained(generator_dir / "attribute_adapter")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = tiny_compact_config(image_size=64)
        AttributeEncoder(config).save_pretrained(encoder_dir)

    bench = _load_generation_bench()
    argv = ["--generator", str(generator_dir), "--encoder", str(encoder_dir), "--resolution", "64", "--steps", "4"]
    assert bench.main([*argv, "--strength", "0.5", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    assert "p50 of one apply-to-my-image (personalize, N = 1):" in printed
    assert "l = 5 attribute tokens" in printed  # 4 connector tokens + the pooled vector
    rows = [line for line in printed.splitlines() if line.startswith("| apply:")]
    assert [row.split(" | ")[0] for row in rows] == [
        "| apply: personalize",
        "| apply: compose N=1",
        "| apply: compose N=2",
        "| apply: compose N=3",
    ]
    assert [row.split(" | ")[1] for row in rows] == ["3", "3", "4", "5"]  # condition rows per step: N + 2
