"""Transfer score with the real attribute encoder (a tiny random mllm encoder from encoder.testing)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from encoder import testing as encoder_testing
from generator_plugin.testing import tiny_generator, tiny_prompt_embeds
from tests.generator_plugin.conftest import settings


@pytest.fixture(scope="module")
def attribute_encoder(tmp_path_factory):
    return encoder_testing.tiny_mllm_encoder(tmp_path_factory.mktemp("tiny-qwen-vl"), seed=0).eval()


def reference_images() -> list[PIL.Image.Image]:
    generator = np.random.default_rng(0)
    return [PIL.Image.fromarray(generator.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]


def pooled(attribute_encoder, images, attributes) -> torch.Tensor:
    with torch.no_grad():
        return attribute_encoder.encode(images, attributes).pooled.float()


def test_each_output_is_scored_under_each_requested_attribute(attribute_encoder):
    images, attributes = reference_images(), ["image lighting", "art style"]
    with torch.no_grad():
        token_width = attribute_encoder.encode(images[:1], attributes[:1]).tokens.shape[-1]
    pipe = tiny_generator(seed=0, token_dim=token_width)
    prompt_embeds, pooled_prompt = tiny_prompt_embeds(pipe)
    prompt = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt}
    refs = [(images[0], attributes[0], 1.0), (images[1], attributes[1], 0.5)]

    output = pipe.compose(refs, attribute_encoder=attribute_encoder, **prompt, **settings(num_images_per_prompt=2))

    assert output.attributes == attributes
    assert output.transfer_scores.shape == (2, 2)
    reference = pooled(attribute_encoder, images, attributes)  # (N, d)
    for b, generated in enumerate(output.images):
        expected = F.cosine_similarity(pooled(attribute_encoder, [generated] * 2, attributes), reference, dim=-1)
        torch.testing.assert_close(output.transfer_scores[b], expected, atol=1e-5, rtol=0)
    assert output.transfer_scores.abs().max() <= 1.0 + 1e-6


def test_references_are_encoded_with_the_encoder(attribute_encoder):
    images, attributes = reference_images(), ["image lighting", "art style"]
    with torch.no_grad():
        embeddings = attribute_encoder.encode(images, attributes)
    pipe = tiny_generator(seed=0, token_dim=embeddings.tokens.shape[-1])
    prompt_embeds, pooled_prompt = tiny_prompt_embeds(pipe)
    prompt = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt}

    pipe.attribute_encoder = attribute_encoder
    from_images = pipe.personalize([(images[0], attributes[0])], **prompt, **settings(output_type="np"))
    from_tokens = pipe.personalize(attribute_tokens=embeddings.tokens[:1], **prompt, **settings(output_type="np"))

    assert np.abs(from_images.images - from_tokens.images).max() <= 1e-5
    assert from_images.transfer_scores.shape == (1, 1)
    assert from_tokens.transfer_scores is None  # precomputed tokens carry no reference to compare with
