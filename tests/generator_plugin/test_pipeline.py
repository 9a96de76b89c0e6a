"""AttributePipeline on a tiny random transformer and VAE: the guidance rule, batching, seeds, bad input."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import PIL.Image
import pytest
import torch

from generator_plugin.adapter import AttributeTokenWidthError
from generator_plugin.pipeline import (
    AttributePipeline,
    AttributePipelineInputs,
    GeneratorInputError,
    PromptInputs,
    ReferenceInputs,
    SamplingInputs,
    gaussian_blur,
    keep_base_detail,
)
from generator_plugin.testing import random_attribute_tokens, tiny_generator, tiny_text_encoders
from omniattr.domain import DEFAULT_BASE_STRENGTH
from tests.generator_plugin.conftest import HEIGHT, STEPS, WIDTH, settings


def sequential_reference(pipe, prompt, tokens, weights, guidance_scale, latents):
    """The composition rule evaluated with N + 2 separate single-row transformer calls per step.

    Written independently of the pipeline's batching: null-attribute rows run the transformer without any
    adapter input, attribute rows without a mask, and the null text is zeros.
    """
    transformer, adapter = pipe.transformer, pipe.attribute_adapter
    timesteps = pipe.prepare_timesteps(STEPS, latents.shape[1])
    scheduler = copy.deepcopy(pipe.scheduler)
    text, pooled = prompt["prompt_embeds"], prompt["pooled_prompt_embeds"]
    null_text, null_pooled = torch.zeros_like(text), torch.zeros_like(pooled)
    image_ids = pipe.prepare_latent_image_ids(HEIGHT, WIDTH)
    text_ids = torch.zeros(text.shape[1], 3)

    def velocity(x, t, text_embeds, pooled_embeds, attribute=None):
        kwargs = None if attribute is None else adapter.attention_kwargs(attribute[None])
        return transformer(
            hidden_states=x,
            timestep=t.expand(1) / 1000,
            pooled_projections=pooled_embeds,
            encoder_hidden_states=text_embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            joint_attention_kwargs=kwargs,
            return_dict=False,
        )[0]

    x = latents.clone()
    with torch.no_grad():
        for t in timesteps:
            null = velocity(x, t, null_text, null_pooled)  # D(0, 0)
            guided = null + guidance_scale * (velocity(x, t, text, pooled) - null)  # text-guided D(0, c)
            for attribute, weight in zip(tokens, weights, strict=True):
                guided = guided + weight * (velocity(x, t, null_text, null_pooled, attribute) - null)
            x = scheduler.step(guided, t, x, return_dict=False)[0]
    return x


def initial_latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(seed))  # (B, S, 4 * C_lat)


def base_image() -> PIL.Image.Image:
    """A 80x60 colour ramp: not the output size, so the pipeline must resize and crop it."""
    ramp = np.linspace(0, 255, 80, dtype=np.uint8)
    channels = [np.tile(ramp, (60, 1)), np.tile(ramp[::-1], (60, 1)), np.full((60, 80), 128, np.uint8)]
    return PIL.Image.fromarray(np.stack(channels, axis=-1))


@pytest.mark.slow
@pytest.mark.parametrize(("num_refs", "guidance_scale"), [(1, 1.0), (3, 1.0), (4, 2.5)])
def test_batched_composition_equals_the_sequential_reference(pipe, prompt, num_refs, guidance_scale):
    tokens = random_attribute_tokens(num_refs, seed=num_refs)
    weights = [1.0, 0.6, -0.3, 0.8][:num_refs]
    latents = initial_latents()
    expected = sequential_reference(pipe, prompt, tokens, weights, guidance_scale, latents)

    common = dict(attribute_tokens=tokens, attribute_weights=weights, guidance_scale=guidance_scale, **prompt)
    batched = pipe.compose(**common, **settings(latents=latents.clone()), output_type="latent").images
    one_by_one = pipe.compose(
        **common, **settings(latents=latents.clone()), output_type="latent", condition_batch_size=1
    ).images

    assert (batched - expected).abs().max() <= 1e-5
    assert (one_by_one - expected).abs().max() <= 1e-5
    # The references matter: without them the result is a different image.
    unconditioned = pipe(
        guidance_scale=guidance_scale, **prompt, **settings(latents=latents.clone()), output_type="latent"
    )
    assert (unconditioned.images - batched).abs().max() > 1e-3


def test_batched_forward_runs_all_conditions_at_once(pipe, prompt):
    batch_sizes = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    tokens = random_attribute_tokens(3)
    pipe.compose(attribute_tokens=tokens, attribute_weights=[1.0, 1.0, 1.0], **prompt, **settings())
    assert batch_sizes == [3 + 2] * STEPS
    # Apply to my image composes the same way: N = 2 references over a base image, one forward per step, and
    # only the steps after int(steps - steps * strength) run (here int(6 - 3) = 3 of 6).
    batch_sizes.clear()
    pipe.compose(
        attribute_tokens=tokens[:2],
        attribute_weights=[1.0, 0.5],
        image=base_image(),
        strength=0.5,
        **prompt,
        **settings(num_inference_steps=6),
    )
    hook.remove()
    assert batch_sizes == [2 + 2] * 3


# The pipeline's latent output for the call in test_without_a_base_image_the_output_is_unchanged, recorded
# before apply-to-my-image existed (the first 6 values of the first two tokens). The tolerance allows other
# CPUs' rounding; a changed code path (e.g. another draw from the generator) moves them by far more.
OUTPUT_BEFORE_BASE_IMAGES = [
    [0.426194, -1.211107, 0.721511, -0.809794, -0.606613, 1.338085],
    [0.479817, -0.735183, -0.032774, 1.313286, 0.896701, 2.493899],
]


def test_without_a_base_image_the_output_is_unchanged(pipe, prompt):
    """image=None with strength None or 1.0 is text-to-image exactly as before apply-to-my-image."""
    common = dict(attribute_tokens=random_attribute_tokens(2), attribute_weights=[1.0, 0.5], **prompt)
    plain = pipe.compose(**common, **settings(output_type="latent")).images
    assert torch.allclose(plain[0, :2, :6], torch.tensor(OUTPUT_BEFORE_BASE_IMAGES), atol=1e-4)
    for strength in (None, 1.0, 1):
        same = pipe.compose(**common, image=None, strength=strength, **settings(output_type="latent")).images
        assert torch.equal(same, plain)


def test_base_image_starts_from_its_noised_latent(pipe):
    """The first latent is scheduler.scale_noise(base, t_start, noise): (1 - sigma) base + sigma noise."""
    image = base_image()
    base = pipe.encode_image(image, HEIGHT, WIDTH)  # (1, S, 4 * C_lat)
    assert base.shape == (1, 16, 16)
    assert pipe.encode_image(image.convert("RGBA"), HEIGHT, WIDTH).shape == (1, 16, 16)  # made RGB first
    timesteps = pipe.prepare_timesteps(10, base.shape[1], strength=0.3)
    assert len(timesteps) == 3  # int(10 - 3) = 7 steps skipped
    sigma = pipe.scheduler.sigmas[7]
    sampling = SamplingInputs(
        height=HEIGHT, width=WIDTH, generator=torch.Generator().manual_seed(5), image=image, strength=0.3
    )
    start = pipe.prepare_image_latents(sampling, timesteps[:1])
    noise = pipe.prepare_latents(1, 4, HEIGHT, WIDTH, torch.float32, "cpu", torch.Generator().manual_seed(5))
    assert torch.allclose(start, (1 - sigma) * base + sigma * noise, atol=1e-6)


def test_small_strength_keeps_the_base_image(pipe, prompt):
    """Mean |output latent - base latent| grows with the strength; at 0.1 it is a fraction of that at 1.0.

    Compared on latents: the tiny random VAE decodes almost every latent to the same grey image.
    """
    image = base_image()
    base = pipe.encode_image(image, HEIGHT, WIDTH)
    common = dict(attribute_tokens=random_attribute_tokens(2), attribute_weights=[1.0, 0.5], image=image, **prompt)
    distance = {}
    for strength in (0.1, 0.5, 1.0):
        output = pipe.compose(
            **common, strength=strength, **settings(num_inference_steps=10, output_type="latent")
        ).images
        distance[strength] = (output - base).abs().mean().item()
    assert distance[0.1] < distance[0.5] < distance[1.0]
    assert distance[0.1] < 0.25 * distance[1.0]
    # The references still steer it: the same start without them ends elsewhere.
    unsteered = pipe(image=image, strength=0.5, **prompt, **settings(num_inference_steps=10, output_type="latent"))
    steered = pipe.compose(**common, strength=0.5, **settings(num_inference_steps=10, output_type="latent"))
    assert (unsteered.images - steered.images).abs().max() > 1e-3
    # and a base image alone defaults to DEFAULT_BASE_STRENGTH
    default = pipe.compose(**common, **settings(num_inference_steps=10, output_type="latent")).images
    explicit = pipe.compose(
        **common, strength=DEFAULT_BASE_STRENGTH, **settings(num_inference_steps=10, output_type="latent")
    ).images
    assert torch.equal(default, explicit)
    # personalize takes the base the same way: it is compose with one reference of weight attribute_scale
    one = dict(attribute_tokens=common["attribute_tokens"][:1], image=image, strength=0.5, **prompt)
    personalized = pipe.personalize(**one, attribute_scale=0.8, **settings(output_type="latent")).images
    composed = pipe.compose(**one, attribute_weights=[0.8], **settings(output_type="latent")).images
    assert torch.equal(personalized, composed)


def test_keep_detail_puts_the_base_detail_on_the_output(pipe, prompt):
    """keep_detail = sigma: output = blur(generated) + base - blur(base), the generated image's coarse content
    with the base's fine detail; 0 is the generator's output as is."""
    image = PIL.Image.fromarray(
        np.random.default_rng(3).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    )  # a noisy base: all detail

    def run(**kwargs):  # the same noise every call
        return pipe(image=image, strength=0.5, **prompt, **settings(num_inference_steps=4, output_type="pt"), **kwargs)

    raw = run().images  # (1, 3, H, W) in [0, 1]
    assert torch.equal(run(keep_detail=0).images, raw)
    kept = run(keep_detail=1.5).images
    base = pipe.preprocess_base(image, HEIGHT, WIDTH)  # (1, 3, H, W) in [-1, 1]

    def detail(pixels):  # what a blur of sigma 1.5 removes
        return pixels - gaussian_blur(pixels, 1.5)

    base_detail = detail(base)
    # the tiny random VAE decodes to a near-flat image: its detail is far from the base's, the kept one is close
    assert (detail(raw * 2 - 1) - base_detail).abs().mean() > 3 * (detail(kept * 2 - 1) - base_detail).abs().mean()
    # and the coarse content is still the generator's
    assert (gaussian_blur(kept * 2 - 1, 4.0) - gaussian_blur(raw * 2 - 1, 4.0)).abs().mean() < 0.05


def test_keep_base_detail_is_the_blurred_output_plus_the_base_detail():
    generator = torch.Generator().manual_seed(1)
    decoded, base = torch.rand(2, 3, 16, 16, generator=generator) - 0.5, torch.rand(1, 3, 16, 16, generator=generator)
    kept = keep_base_detail(decoded, base, 1.0)
    assert kept.shape == decoded.shape
    assert torch.allclose(kept, gaussian_blur(decoded, 1.0) + base - gaussian_blur(base, 1.0))  # inside [-1, 1]
    assert keep_base_detail(decoded * 4, base * 4, 1.0).abs().max() <= 1.0  # clamped


def test_gaussian_blur_keeps_flat_images_and_the_mean():
    flat = torch.full((2, 3, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(flat, 2.0), flat, atol=1e-6)
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(noise, 2.0)
    assert blurred.shape == noise.shape and blurred.std() < 0.5 * noise.std()
    assert torch.isfinite(gaussian_blur(noise, 30.0)).all()  # a radius beyond the image is clipped to it


@pytest.mark.slow
def test_one_reference_with_weight_one_equals_personalization(pipe, prompt):
    tokens = random_attribute_tokens(1)
    for guidance_scale in (1.0, 3.0):
        composed = pipe.compose(
            attribute_tokens=tokens,
            attribute_weights=[1.0],
            guidance_scale=guidance_scale,
            **prompt,
            **settings(),
        )
        personalized = pipe.personalize(attribute_tokens=tokens, guidance_scale=guidance_scale, **prompt, **settings())
        assert np.array_equal(np.asarray(composed.images[0]), np.asarray(personalized.images[0]))
    # and the reference changes the image: personalization is not the plain text-to-image output
    plain = pipe(**prompt, **settings(output_type="np")).images
    with_attribute = pipe.personalize(attribute_tokens=tokens, **prompt, **settings(output_type="np")).images
    assert np.abs(plain - with_attribute).max() > 1e-3


def test_weight_zero_reference_contributes_nothing(pipe, prompt):
    tokens = random_attribute_tokens(2)
    both = pipe.compose(attribute_tokens=tokens, attribute_weights=[0.7, 0.0], **prompt, **settings(output_type="np"))
    first = pipe.compose(attribute_tokens=tokens[:1], attribute_weights=[0.7], **prompt, **settings(output_type="np"))
    assert np.abs(both.images - first.images).max() <= 1e-5


def test_the_adapters_weight_gain_multiplies_every_weight(pipe, prompt):
    tokens = random_attribute_tokens(2)

    def latents(weights):
        return pipe.compose(
            attribute_tokens=tokens, attribute_weights=weights, **prompt, **settings(output_type="latent")
        ).images

    expected = latents([2.4, 0.6])
    pipe.attribute_adapter.config = dataclasses.replace(pipe.attribute_adapter.config, weight_gain=3.0)
    try:
        gained = latents([0.8, 0.2])
    finally:
        pipe.attribute_adapter.config = dataclasses.replace(pipe.attribute_adapter.config, weight_gain=1.0)
    assert (gained - expected).abs().max() < 1e-5
    assert (latents([0.8, 0.2]) - expected).abs().max() > 1e-3  # without the gain: another image


def test_without_a_size_the_output_has_the_vaes_trained_size(pipe, prompt):
    vae = copy.deepcopy(pipe.vae)
    vae.register_to_config(sample_size=32)  # a VAE trained at 32 px (the CPU starter's records 128)
    small = AttributePipeline(**{**pipe.components, "vae": vae})
    unsized = {key: value for key, value in settings().items() if key not in ("height", "width")}
    assert small(**prompt, **unsized).images[0].size == (32, 32)


def test_fixed_seed_reproduces_the_image(pipe, prompt):
    common = dict(attribute_tokens=random_attribute_tokens(2), attribute_weights=[1.0, 0.5], **prompt)
    first = pipe.compose(**common, **settings(seed=7))
    second = pipe.compose(**common, **settings(seed=7))
    other_seed = pipe.compose(**common, **settings(seed=8))
    assert isinstance(first.images[0], PIL.Image.Image) and first.images[0].size == (WIDTH, HEIGHT)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    assert not np.array_equal(np.asarray(first.images[0]), np.asarray(other_seed.images[0]))


def test_several_images_per_prompt_match_single_runs(pipe, prompt):
    common = dict(attribute_tokens=random_attribute_tokens(2), attribute_weights=[1.0, 0.5], **prompt)
    latents = torch.cat([initial_latents(0), initial_latents(1)])
    pair = pipe.compose(**common, **settings(latents=latents, num_images_per_prompt=2, output_type="np")).images
    for index in range(2):
        single = pipe.compose(**common, **settings(latents=latents[index : index + 1], output_type="np")).images
        assert np.abs(pair[index] - single[0]).max() <= 1e-5


@pytest.mark.slow
def test_text_encoder_seam_matches_precomputed_embeddings():
    pipe = tiny_generator(seed=0)
    with_text = AttributePipeline(pipe.transformer, pipe.vae, pipe.scheduler, **tiny_text_encoders(seed=0))
    with_text.set_progress_bar_config(disable=True)
    prompt_embeds, pooled = with_text.encode_prompt("a red dog", max_sequence_length=16)
    assert prompt_embeds.shape == (1, 16, 32) and pooled.shape == (1, 32)

    from_text = with_text(prompt="a red dog", max_sequence_length=16, **settings(output_type="np")).images
    from_embeds = with_text(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, **settings(output_type="np"))
    other_prompt = with_text(prompt="a blue cat", max_sequence_length=16, **settings(output_type="np")).images
    assert np.abs(from_text - from_embeds.images).max() <= 1e-5
    assert np.abs(from_text - other_prompt).max() > 1e-4


def test_bad_input_is_refused_with_a_message_naming_the_fix(pipe, prompt):
    tokens = random_attribute_tokens(9)
    image = PIL.Image.new("RGB", (32, 32))
    cases = [
        (dict(attribute_tokens=tokens, attribute_weights=[1.0] * 9), GeneratorInputError, "at most 8"),
        (
            dict(attribute_tokens=tokens[:2], attribute_weights=[1.0]),
            GeneratorInputError,
            "1 attribute_weights for 2",
        ),
        (dict(attribute_tokens=tokens[:2]), GeneratorInputError, "need attribute_weights"),
        (
            dict(attribute_tokens=random_attribute_tokens(1, token_dim=48), attribute_weights=[1.0]),
            AttributeTokenWidthError,
            "width 48 .* expects d_ctx = 32",
        ),
        (dict(refs=[(image, "lighting", 1.0)]), GeneratorInputError, "need an attribute encoder"),
        (
            dict(attribute_tokens=torch.zeros(4, 32), attribute_weights=[1.0]),
            GeneratorInputError,
            r"\(N, l, d_ctx\)",
        ),
        (
            dict(negative_prompt_embeds=torch.zeros(1, 3, 32), negative_pooled_prompt_embeds=torch.zeros(1, 32)),
            GeneratorInputError,
            "must have the shape of",
        ),
        (dict(refs=[(image, "lighting")]), GeneratorInputError, r"\(image, attribute, weight\) triple"),
        (dict(refs=[(image, "lighting", float("nan"))]), GeneratorInputError, "finite number"),
        (dict(refs=[(image, "lighting", 1.0)] * 9), GeneratorInputError, "at most 8"),
        (dict(height=72), GeneratorInputError, "multiples of 16"),
        (dict(image=image, strength=0.0), GeneratorInputError, r"strength must be a number in \(0, 1\]"),
        (dict(image=image, strength=1.5), GeneratorInputError, r"strength must be a number in \(0, 1\]"),
        (dict(image=image, strength=float("nan")), GeneratorInputError, "strength must be a number"),
        (dict(image=image, strength="0.5"), GeneratorInputError, "strength must be a number"),
        (dict(strength=0.5), GeneratorInputError, "needs a base image: pass image="),
        (dict(image=np.zeros((64, 64, 3))), GeneratorInputError, r"must be a PIL.Image; got ndarray.*Image.open"),
        (dict(image=image, latents=torch.zeros(1, 16, 16)), GeneratorInputError, "either latents .* or a base"),
        (dict(image=image, strength=1e-20), GeneratorInputError, "leaves none of the 1 steps"),
        (dict(keep_detail=2.0), GeneratorInputError, "keeps a base image's detail: pass image="),
        (dict(image=image, keep_detail=-1.0), GeneratorInputError, r"keep_detail must be a number in \[0, 32"),
        (dict(image=image, keep_detail=float("nan")), GeneratorInputError, "keep_detail must be a number"),
        (dict(image=image, keep_detail=True), GeneratorInputError, "keep_detail must be a number"),
        (dict(image=image, keep_detail=2.0, output_type="latent"), GeneratorInputError, "works on the decoded"),
    ]
    for kwargs, error, message in cases:
        call = {**prompt, "height": HEIGHT, "width": WIDTH, "num_inference_steps": 1, **kwargs}
        with pytest.raises(error, match=message):
            pipe(**call)

    with pytest.raises(GeneratorInputError, match="exactly one of prompt"):
        pipe(prompt="a dog", **prompt)
    with pytest.raises(GeneratorInputError, match="no text encoders; pass prompt_embeds"):
        pipe(prompt="a dog")
    with pytest.raises(GeneratorInputError, match=r"prompt_embeds must have shape \(1, T, 32\)"):
        pipe(prompt_embeds=torch.zeros(1, 4, 8), pooled_prompt_embeds=torch.zeros(1, 32))
    with pytest.raises(GeneratorInputError, match=r"\(image, attribute\) pair"):
        pipe.personalize(refs=[(image, "lighting", 1.0)], **prompt)

    pipe.unload_attribute_adapter()
    with pytest.raises(GeneratorInputError, match="load_attribute_adapter"):
        pipe(attribute_tokens=tokens[:1], attribute_weights=[1.0], **prompt)


def test_inputs_are_gathered_once_and_checked_refs_come_back_normalised(pipe, prompt):
    """`check_inputs` takes the inputs dataclass and returns it with (image, attribute, float weight) triples
    and the strength resolved (1.0 without a base image)."""
    image = PIL.Image.new("RGB", (32, 32))
    inputs = AttributePipelineInputs(
        prompt=PromptInputs(**prompt),
        references=ReferenceInputs(refs=[[image, "lighting", 2]], encoder=object()),
        sampling=SamplingInputs(height=HEIGHT, width=WIDTH),
    )
    checked = pipe.check_inputs(inputs)
    assert checked.references.refs == [(image, "lighting", 2.0)]
    assert isinstance(checked.references.refs[0][2], float)
    assert checked.prompt is inputs.prompt
    assert inputs.sampling.strength is None and checked.sampling.strength == 1.0
    assert (checked.sampling.height, checked.sampling.width) == (HEIGHT, WIDTH)
    with pytest.raises(dataclasses.FrozenInstanceError):
        checked.output_type = "np"


def test_max_references_is_the_domain_rule():
    """The public `generator_plugin.MAX_REFERENCES` still resolves, to the one domain definition."""
    import generator_plugin
    from omniattr import domain

    assert generator_plugin.MAX_REFERENCES == domain.MAX_REFERENCES == 8


def test_references_reach_a_pooled_token_adapter_as_tokens_plus_the_pooled_vector(pipe, prompt):
    from encoder import AttributeEncoder
    from encoder.testing import tiny_compact_config
    from generator_plugin.adapter import AttributeAdapter
    from generator_plugin.testing import randomize_attribute_adapter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = tiny_compact_config(image_size=64)
        encoder = AttributeEncoder(config).eval()
    pipe.unload_attribute_adapter()
    adapter = AttributeAdapter.for_transformer(pipe.transformer, token_dim=32, pooled_token=True)
    pipe.load_attribute_adapter(randomize_attribute_adapter(adapter))
    image = base_image()
    with torch.no_grad():
        embeddings = encoder.encode([image], ["lighting"])
    from_refs = pipe.personalize(refs=[(image, "lighting")], attribute_encoder=encoder, **prompt, **settings())
    expected = torch.cat([embeddings.tokens, embeddings.pooled.unsqueeze(1)], dim=1)  # (1, 5, 32)
    from_tokens = pipe.personalize(attribute_tokens=expected, **prompt, **settings())
    assert np.array_equal(np.asarray(from_refs.images[0]), np.asarray(from_tokens.images[0]))
    without_pooled = pipe.personalize(attribute_tokens=embeddings.tokens, **prompt, **settings())
    assert not np.array_equal(np.asarray(from_refs.images[0]), np.asarray(without_pooled.images[0]))
