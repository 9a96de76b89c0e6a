"""Tiny random generators for the generator-plugin tests: real diffusers models built from configs."""

from __future__ import annotations

import pytest
import torch

from generator_plugin.testing import tiny_generator, tiny_prompt_embeds

HEIGHT = WIDTH = 64  # tiny VAE: 64x64 image -> 4x8x8 latent -> 16 tokens
STEPS = 3


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread: these models are tiny, and on shared cores two threads ran 5-20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def pipe():
    """A tiny AttributePipeline with a random-weights attribute adapter (token width 32)."""
    return tiny_generator(seed=0, token_dim=32)


@pytest.fixture
def prompt(pipe):
    """Random prompt embeddings standing in for text-encoder output."""
    prompt_embeds, pooled_prompt_embeds = tiny_prompt_embeds(pipe, seed=1)
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}


def settings(seed: int = 0, **overrides) -> dict:
    """Sampling settings shared by calls that must agree."""
    values = {
        "height": HEIGHT,
        "width": WIDTH,
        "num_inference_steps": STEPS,
        "generator": torch.Generator().manual_seed(seed),
    }
    values.update(overrides)
    return values
