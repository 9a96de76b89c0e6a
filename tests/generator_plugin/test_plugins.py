"""Generator plugins: the built-in `flux` loader on a saved tiny model, entry points, clear errors."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import numpy as np
import pytest
import torch

from generator_plugin.adapter import ADAPTER_CONFIG_NAME
from generator_plugin.pipeline import AttributePipeline
from generator_plugin.plugins import (
    FluxGeneratorPlugin,
    GeneratorWeightsNotFoundError,
    UnknownGeneratorError,
    available_generators,
    get_generator_plugin,
    load_generator,
)
from generator_plugin.testing import (
    random_attribute_tokens,
    tiny_generator,
    tiny_prompt_embeds,
    tiny_text_encoders,
)
from tests.generator_plugin.conftest import settings

FIXTURE_INSTALL = "pip install -e tests/fixtures/example_generator_plugin --no-deps --no-build-isolation"


def composed(pipe, prompt, seed=0):
    tokens = random_attribute_tokens(2)
    return pipe.compose(
        attribute_tokens=tokens, attribute_weights=[1.0, 0.5], **prompt, **settings(seed, output_type="np")
    )


def test_flux_plugin_reloads_a_saved_tiny_generator(tmp_path):
    original = tiny_generator(seed=3)
    prompt_embeds, pooled = tiny_prompt_embeds(original)
    prompt = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
    original.save_pretrained(tmp_path / "generator")
    for part in ("transformer", "vae", "scheduler"):
        assert (tmp_path / "generator" / part).is_dir()
    assert (tmp_path / "generator" / "attribute_adapter" / ADAPTER_CONFIG_NAME).is_file()

    loaded = load_generator("flux", tmp_path / "generator")
    loaded.set_progress_bar_config(disable=True)

    assert isinstance(loaded, AttributePipeline) and loaded.attribute_adapter is not None
    assert loaded.text_encoder is None
    assert np.array_equal(composed(loaded, prompt).images, composed(original, prompt).images)


def test_flux_plugin_loads_text_encoders_and_a_separate_adapter(tmp_path):
    base = tiny_generator(seed=0, token_dim=None)
    with_text = AttributePipeline(base.transformer, base.vae, base.scheduler, **tiny_text_encoders(seed=0))
    with_text.save_pretrained(tmp_path / "generator")
    trained = tiny_generator(seed=5, token_dim=32)
    trained.attribute_adapter.save_pretrained(tmp_path / "adapter")

    loaded = load_generator("flux", tmp_path / "generator", adapter_dir=tmp_path / "adapter")
    loaded.set_progress_bar_config(disable=True)

    assert loaded.text_encoder is not None and loaded.tokenizer_2 is not None
    torch.testing.assert_close(loaded.encode_prompt("a dog", 16), with_text.encode_prompt("a dog", 16))
    assert loaded.attribute_adapter.config == trained.attribute_adapter.config
    for name, tensor in trained.attribute_adapter.state_dict().items():
        assert torch.equal(loaded.attribute_adapter.state_dict()[name], tensor)


def test_missing_weights_and_unknown_names_are_clear_errors(tmp_path):
    with pytest.raises(GeneratorWeightsNotFoundError, match="does not exist"):
        load_generator("flux", tmp_path / "missing")
    (tmp_path / "partial" / "transformer").mkdir(parents=True)
    with pytest.raises(GeneratorWeightsNotFoundError, match="missing vae/, scheduler/"):
        load_generator("flux", tmp_path / "partial")
    with pytest.raises(UnknownGeneratorError, match="unknown generator plugin 'nope'; available: .*flux"):
        load_generator("nope", tmp_path)


def test_builtin_flux_plugin_is_listed():
    assert isinstance(get_generator_plugin("flux"), FluxGeneratorPlugin)
    assert "flux" in available_generators()


def test_third_party_plugin_is_discovered_by_entry_point_and_used(tmp_path):
    generators = available_generators()
    if "example" not in generators:
        pytest.fail(f"the example plugin fixture is not installed in this environment; run: {FIXTURE_INSTALL}")
    assert isinstance(generators["example"], EntryPoint)

    from example_generator_plugin import write_example_weights

    pipe = load_generator("example", write_example_weights(tmp_path / "example", seed=4))
    pipe.set_progress_bar_config(disable=True)
    prompt_embeds, pooled = tiny_prompt_embeds(pipe)
    prompt = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
    images = composed(pipe, prompt).images
    assert images.shape == (1, 64, 64, 3)
    # It is the generator the plugin describes (seed 4), not some default one.
    assert np.array_equal(images, composed(tiny_generator(seed=4), prompt).images)
