"""AttributePipeline: personalization and multi-attribute composition with D(A, c).

D(A, c) is a frozen FLUX-style flow transformer with an attribute adapter (generator_plugin.adapter), an
AutoencoderKL and a text-encoder seam: FLUX's CLIP (pooled) + T5 (sequence) encoders when present, or
precomputed prompt embeddings, so text encoders are optional.

Guidance, one rule for everything (Composable Diffusion, as in the paper's composition figure, with
InstructPix2Pix-style text guidance):

    v* = D(0, 0) + s_c (D(0, c) - D(0, 0)) + sum_i w_i (D(A_i, 0) - D(0, 0))

- s_c is `guidance_scale` (text guidance). With s_c = 1 this is exactly the paper's
  v* = D(0, c) + sum_i w_i (D(A_i, 0) - D(0, 0)).
- Null attribute "A = 0": the adapter is off for that row (per-row mask 0 in the attention processors),
  i.e. the frozen base model. Null text "c = 0": `negative_prompt_embeds` / `negative_pooled_prompt_embeds`
  when given (e.g. the empty prompt's embeddings), otherwise zeros of the prompt embeddings' shape.
  Training must drop conditions the same way.
- Personalization is the one-reference case with w_1 = `attribute_scale`: D(A, c) "with guidance" means the
  attribute's flow field D(A, 0) - D(0, 0) added to the (text-guided) prompt's flow field. So compose with one
  reference of weight w equals personalize with attribute_scale = w, by construction. Every w_i is the user's
  weight times the adapter's calibrated `weight_gain` (AttributeAdapterConfig; 1 unless the adapter sets it).
- Every step evaluates the N + 2 condition rows [D(0,0), D(0,c), D(A_1,0) .. D(A_N,0)] in one batched
  transformer forward (`condition_batch_size` can split it to save memory; 1 gives N + 2 sequential calls).
- Apply to my image (img2img, diffusers' convention and FluxImg2ImgPipeline's steps): with `image=` and
  `strength=` s in (0, 1] the base image is resized and centre-cropped to the output size, encoded by the VAE
  (the posterior's mode) and packed; the schedule starts at step index t_start = int(steps - steps * s), where
  the latent is the flow-matching interpolation `scheduler.scale_noise(base, t_start, noise)`, and only the
  remaining steps run, with the same guidance rule. Without a strength a base image uses
  `omniattr.domain.DEFAULT_BASE_STRENGTH` (0.6); without an image nothing changes (s = 1, pure noise).
- Keeping the base's detail (`keep_detail=` sigma > 0, with a base image): the decoded output becomes
  blur(output) + base - blur(base), a Gaussian of std sigma output pixels (the "detail transfer" of relighting
  workflows): the attribute's change is kept at scales coarser than sigma and the base's own finer detail put
  back. A small generator's VAE and transformer blur what they draw; this returns the subject's edges and
  texture, and also the base's texture where a reference's art style would replace it. Off by default here
  (None or 0); the product's requests default to `omniattr.domain.default_keep_detail` (2 px, none for a style).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from generator_plugin.adapter import AttributeAdapterLoaderMixin, check_attribute_tokens
from omniattr.domain import DEFAULT_BASE_STRENGTH, MAX_KEEP_DETAIL, MAX_REFERENCES

if TYPE_CHECKING:
    from encoder import AttributeEncoder

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class GeneratorInputError(ValueError):
    """A generation request that cannot run as given; the message says what to change."""


@dataclass
class AttributePipelineOutput(BaseOutput):
    """Generated images and, when the references were images, their attribute-transfer scores."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    # (num_images, N): cos(pooled(E(output_b, a_i)), pooled(E(I_i, a_i))); None without an encoder or image
    # refs.
    transfer_scores: torch.Tensor | None = None
    attributes: list[str] | None = None  # a_i, in the column order of transfer_scores


# The inputs of one call. Frozen: checked once, then read by every stage. eq=False: they hold tensors, whose
# == is elementwise, so two inputs compare by identity.


@dataclass(frozen=True, eq=False)
class PromptInputs:
    """The text condition c (a prompt, or its embeddings), the null text and the text guidance s_c."""

    prompt: str | None = None
    prompt_embeds: torch.Tensor | None = None  # (1, T, joint_dim)
    pooled_prompt_embeds: torch.Tensor | None = None  # (1, pooled_dim)
    negative_prompt_embeds: torch.Tensor | None = None  # (1, T, joint_dim); zeros when None
    negative_pooled_prompt_embeds: torch.Tensor | None = None  # (1, pooled_dim)
    guidance_scale: float = 1.0
    max_sequence_length: int = 512  # T5 tokens when the prompt is encoded here


@dataclass(frozen=True, eq=False)
class ReferenceInputs:
    """The attribute references: (image, attribute, weight) triples to encode, or precomputed tokens + weights."""

    refs: Sequence[tuple[PIL.Image.Image, str, float]] | None = None  # after check_inputs: a list, float weights
    attribute_tokens: torch.Tensor | None = None  # (N, l, d_ctx)
    attribute_weights: Sequence[float] | None = None  # w_i, one per row of attribute_tokens
    encoder: AttributeEncoder | None = None  # encodes refs and scores the outputs


@dataclass(frozen=True, eq=False)
class SamplingInputs:
    """What is sampled: output size, steps, images per prompt, the noise (generator or packed latents), and
    the base image to start from with its strength (apply to my image)."""

    height: int
    width: int
    num_inference_steps: int = 28
    num_images_per_prompt: int = 1
    embedded_guidance_scale: float = 3.5  # FLUX-dev's distilled guidance input, when the transformer has one
    generator: torch.Generator | list[torch.Generator] | None = None
    latents: torch.Tensor | None = None  # (B, S, 4 * C_lat), packed
    image: PIL.Image.Image | None = None  # the base image; resized and centre-cropped to height x width
    strength: float | None = None  # share of the schedule run from the base; after check_inputs a float
    keep_detail: float | None = None  # Gaussian sigma (output pixels) of the base detail kept; None / 0: off


@dataclass(frozen=True, eq=False)
class AttributePipelineInputs:
    """Everything one `AttributePipeline.__call__` takes, gathered from its keyword arguments."""

    prompt: PromptInputs
    references: ReferenceInputs
    sampling: SamplingInputs
    output_type: str = "pil"
    condition_batch_size: int | None = None  # condition rows per transformer forward; None: all N + 2
    score_transfer: bool = True


@dataclass
class _TextConditions:
    prompt_embeds: torch.Tensor  # (1, T, J)
    pooled_prompt_embeds: torch.Tensor  # (1, P_text)
    negative_prompt_embeds: torch.Tensor  # (1, T, J), the null text
    negative_pooled_prompt_embeds: torch.Tensor  # (1, P_text)


@dataclass
class _AttributeConditions:
    tokens: torch.Tensor | None  # (N, l, d_ctx) or None when N = 0
    weights: list[float]  # w_i
    attributes: list[str] | None  # a_i when the references were (image, attribute) pairs
    reference_pooled: torch.Tensor | None  # (N, d) pooled(E(I_i, a_i))


def transfer_scores(
    attribute_encoder: AttributeEncoder,
    images: Sequence[PIL.Image.Image],
    attributes: Sequence[str],
    reference_pooled: torch.Tensor,  # (N, d)
) -> torch.Tensor:
    """cos(pooled(E(image_b, a_i)), reference_pooled_i) for each generated image b and attribute i: (B, N)."""
    num_images, num_refs = len(images), len(attributes)
    pairs_images = [image for image in images for _ in range(num_refs)]  # image-major: row b * N + i
    pairs_attributes = [attribute for _ in range(num_images) for attribute in attributes]
    with torch.no_grad():
        pooled = attribute_encoder.encode(pairs_images, pairs_attributes).pooled  # (B * N, d)
    pooled = pooled.detach().float().cpu().view(num_images, num_refs, -1)  # (B, N, d)
    reference = reference_pooled.detach().float().cpu()[None]  # (1, N, d)
    return F.cosine_similarity(pooled, reference, dim=-1)  # (B, N)


class AttributePipeline(DiffusionPipeline, AttributeAdapterLoaderMixin):
    """D(A, c) for personalization and composition; see the module docstring for the guidance rule."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    _optional_components = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        vae: AutoencoderKL,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder: Any = None,  # CLIPTextModel: pooled prompt embedding
        tokenizer: Any = None,
        text_encoder_2: Any = None,  # T5EncoderModel: prompt token embeddings
        tokenizer_2: Any = None,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        if transformer.config.in_channels != 4 * vae.config.latent_channels:
            raise ValueError(
                f"transformer in_channels ({transformer.config.in_channels}) must be 4 x the VAE's "
                f"latent_channels ({vae.config.latent_channels}): FLUX packs 2x2 latent patches per token."
            )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        # The output side without height / width: the size the VAE was trained at (FLUX.1's VAE config says 1024,
        # the CPU starter's 128), else FLUX's 128 latent cells.
        self.default_image_size = int(getattr(vae.config, "sample_size", None) or 128 * self.vae_scale_factor)
        self.attribute_adapter = None
        self.attribute_encoder: AttributeEncoder | None = None  # used when a call passes none

    def to(self, *args, **kwargs):
        """Move the components, and the attribute adapter with the transformer."""
        super().to(*args, **kwargs)
        if self.attribute_adapter is not None:
            self.attribute_adapter.to(device=self.transformer.device, dtype=self.transformer.dtype)
        return self

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Diffusers layout (model_index.json, transformer/, vae/, scheduler/, ...) and attribute_adapter/."""
        super().save_pretrained(save_directory, **kwargs)
        if self.attribute_adapter is not None:
            self.attribute_adapter.save_pretrained(f"{save_directory}/attribute_adapter")

    # --------------------------------------------------------------------------------------------------------
    # The two entry points users call
    # --------------------------------------------------------------------------------------------------------

    def personalize(
        self,
        refs: Sequence[tuple[PIL.Image.Image, str]] | None = None,
        prompt: str | None = None,
        attribute_scale: float = 1.0,
        **kwargs,
    ) -> AttributePipelineOutput:
        """D(A, c) with guidance: v = D(0,0) + s_c (D(0,c) - D(0,0)) + s_a (D(A,0) - D(0,0)).

        s_a is `attribute_scale`, s_c `guidance_scale`. `refs` are (image, attribute) pairs (usually one);
        each gets weight `attribute_scale`: this is `compose` with every weight equal to `attribute_scale`.
        Other keyword arguments are those of `__call__`, e.g. `image=` and `strength=` to apply the attribute
        to a base image.
        """
        weighted = None
        if refs is not None:
            weighted = []
            for position, ref in enumerate(refs):
                if not isinstance(ref, (tuple, list)) or len(ref) != 2:
                    raise GeneratorInputError(
                        f"personalize: reference {position} must be an (image, attribute) pair; got {ref!r}. "
                        "Use compose() for (image, attribute, weight) triples."
                    )
                weighted.append((ref[0], ref[1], attribute_scale))
        elif "attribute_tokens" in kwargs and "attribute_weights" not in kwargs:
            kwargs["attribute_weights"] = [attribute_scale] * len(kwargs["attribute_tokens"])
        return self(prompt=prompt, refs=weighted, **kwargs)

    def compose(
        self,
        refs: Sequence[tuple[PIL.Image.Image, str, float]] | None = None,
        prompt: str | None = None,
        **kwargs,
    ) -> AttributePipelineOutput:
        """v* = D(0,c) + sum_i w_i (D(A_i,0) - D(0,0)); refs are (image, attribute, w_i) triples.

        With guidance_scale s_c != 1, D(0,c) becomes D(0,0) + s_c (D(0,c) - D(0,0)). Other keyword arguments
        are those of `__call__`, e.g. `image=` and `strength=` to start from a base image.
        """
        return self(prompt=prompt, refs=refs, **kwargs)

    # --------------------------------------------------------------------------------------------------------
    # Helpers for the stages (public so training and tests build the same inputs)
    # --------------------------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, max_sequence_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """FLUX's text path: prompt_embeds (1, T, joint_dim) from T5, pooled (1, pooled_dim) from CLIP."""
        if self.text_encoder is None or self.text_encoder_2 is None:
            raise GeneratorInputError(
                "this generator has no text encoders; pass prompt_embeds (1, T, "
                f"{self.transformer.config.joint_attention_dim}) and pooled_prompt_embeds (1, "
                f"{self.transformer.config.pooled_projection_dim}) instead of a prompt string."
            )
        clip_ids = self.tokenizer(
            [prompt],
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids  # (1, 77)
        pooled_prompt_embeds = self.text_encoder(
            clip_ids.to(self.text_encoder.device), output_hidden_states=False
        ).pooler_output  # (1, pooled_dim)
        t5_ids = self.tokenizer_2(
            [prompt],
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids  # (1, T)
        prompt_embeds = self.text_encoder_2(t5_ids.to(self.text_encoder_2.device), output_hidden_states=False)[0]
        return prompt_embeds, pooled_prompt_embeds  # (1, T, joint_dim), (1, pooled_dim)

    def prepare_latent_image_ids(self, height: int, width: int) -> torch.Tensor:
        """RoPE positions of the packed latent tokens: (S, 3) with (0, row, column)."""
        latent_height = 2 * (height // (self.vae_scale_factor * 2))
        latent_width = 2 * (width // (self.vae_scale_factor * 2))
        rows, columns = torch.meshgrid(
            torch.arange(latent_height // 2), torch.arange(latent_width // 2), indexing="ij"
        )  # (h/2, w/2) each
        ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3)  # (S, 3)
        return ids.to(device=self._execution_device, dtype=self.transformer.dtype)

    def prepare_timesteps(self, num_inference_steps: int, image_seq_len: int, strength: float = 1.0) -> torch.Tensor:
        """FLUX's schedule: sigmas 1 -> 1/steps, resolution-dependent shift when the scheduler asks for it.

        With strength s < 1 (a base image) only the last steps run, from index int(steps - steps * s) on
        (FluxImg2ImgPipeline.get_timesteps); s = 1 is the whole schedule.
        """
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        config = self.scheduler.config
        # mu grows linearly with the token count, from base_shift at base_image_seq_len to max_shift at max.
        base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        mu = base_shift + (max_shift - base_shift) * (image_seq_len - base_len) / (max_len - base_len)
        self.scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=self._execution_device)
        start = first_step(num_inference_steps, strength)
        self.scheduler.set_begin_index(start)
        return self.scheduler.timesteps[start:]

    @torch.no_grad()
    def preprocess_base(self, image: PIL.Image.Image, height: int, width: int) -> torch.Tensor:
        """A base image -> (1, 3, H, W) pixels in [-1, 1], resized and centre-cropped to height x width."""
        if image.mode != "RGB":  # greyscale, palette, alpha: the VAE takes 3 channels
            image = image.convert("RGB")
        pixels = self.image_processor.preprocess(image, height=height, width=width, resize_mode="crop")
        return pixels.to(device=self._execution_device, dtype=self.vae.dtype)

    def encode_image(self, image: PIL.Image.Image, height: int, width: int) -> torch.Tensor:
        """A base image -> its packed VAE latent (1, S, 4 * C_lat), resized and centre-cropped to height x width."""
        pixels = self.preprocess_base(image, height, width)  # (1, 3, H, W) in [-1, 1]
        # The posterior's mode, not a sample: the same base gives the same latent; the seed drives the noise.
        latent = self.vae.encode(pixels).latent_dist.mode()  # (1, C_lat, h, w)
        latent = (latent - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        return self.pack_latents(latent.to(self.transformer.dtype))

    def prepare_image_latents(self, sampling: SamplingInputs, first_timestep: torch.Tensor) -> torch.Tensor:
        """The base image's latent noised to `first_timestep` (flow matching: (1 - sigma) x_0 + sigma noise)."""
        device, dtype = self._execution_device, self.transformer.dtype
        base = self.encode_image(sampling.image, sampling.height, sampling.width)  # (1, S, 4 * C_lat)
        base = base.expand(sampling.num_images_per_prompt, -1, -1)  # (B, S, 4 * C_lat)
        noise = self.prepare_latents(
            sampling.num_images_per_prompt,
            self.transformer.config.in_channels // 4,
            sampling.height,
            sampling.width,
            dtype,
            device,
            sampling.generator,
        )  # (B, S, 4 * C_lat), packed like the base: scale_noise is elementwise
        timestep = first_timestep.expand(sampling.num_images_per_prompt)  # (B,)
        return self.scheduler.scale_noise(base, timestep, noise)

    # --------------------------------------------------------------------------------------------------------
    # The pipeline
    # --------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | None = None,
        refs: Sequence[tuple[PIL.Image.Image, str, float]] | None = None,
        attribute_tokens: torch.Tensor | None = None,
        attribute_weights: Sequence[float] | None = None,
        attribute_encoder: AttributeEncoder | None = None,
        guidance_scale: float = 1.0,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        num_images_per_prompt: int = 1,
        embedded_guidance_scale: float = 3.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        image: PIL.Image.Image | None = None,
        strength: float | None = None,
        keep_detail: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        condition_batch_size: int | None = None,
        max_sequence_length: int = 512,
        score_transfer: bool = True,
    ) -> AttributePipelineOutput | tuple:
        """Generate with v* = D(0,0) + s_c (D(0,c) - D(0,0)) + sum_i w_i (D(A_i,0) - D(0,0)).

        Args:
            prompt / prompt_embeds + pooled_prompt_embeds: the text condition c (one of the two).
            refs: up to MAX_REFERENCES (image, attribute, weight) triples, encoded with `attribute_encoder`
                (or `self.attribute_encoder`); or
            attribute_tokens: precomputed encoder tokens (N, l, d_ctx) with `attribute_weights` (N floats); for an
                adapter with `pooled_token`, the adapter's `condition_tokens` of the encoder's output (N, l + 1, d_ctx).
            guidance_scale: text guidance s_c; 1.0 disables it.
            negative_prompt_embeds / negative_pooled_prompt_embeds: the null text; zeros when not given.
            embedded_guidance_scale: FLUX-dev's distilled guidance input, used if the transformer has one.
            image: a base image to start from (apply to my image); None generates from noise.
            strength: in (0, 1], how much of the schedule runs from the base image: small keeps it, 1.0 starts
                from pure noise. Default: DEFAULT_BASE_STRENGTH (0.6) with an image, 1.0 without.
            keep_detail: with an image, keep the base's detail finer than this Gaussian sigma (output pixels):
                the output is blur(output) + base - blur(base). None or 0: the generator's output as is.
            condition_batch_size: at most this many condition rows per transformer forward (None: all N + 2).
            score_transfer: re-encode every output under each attribute and return the transfer scores.

        The arguments are gathered into an `AttributePipelineInputs` and checked once (`check_inputs`).
        """
        # 1. Check inputs
        inputs = self.check_inputs(
            AttributePipelineInputs(
                prompt=PromptInputs(
                    prompt=prompt,
                    prompt_embeds=prompt_embeds,
                    pooled_prompt_embeds=pooled_prompt_embeds,
                    negative_prompt_embeds=negative_prompt_embeds,
                    negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                    guidance_scale=guidance_scale,
                    max_sequence_length=max_sequence_length,
                ),
                references=ReferenceInputs(
                    refs=refs,
                    attribute_tokens=attribute_tokens,
                    attribute_weights=attribute_weights,
                    encoder=attribute_encoder if attribute_encoder is not None else self.attribute_encoder,
                ),
                sampling=SamplingInputs(
                    height=height or self.default_image_size,
                    width=width or self.default_image_size,
                    num_inference_steps=num_inference_steps,
                    num_images_per_prompt=num_images_per_prompt,
                    embedded_guidance_scale=embedded_guidance_scale,
                    generator=generator,
                    latents=latents,
                    image=image,
                    strength=strength,
                    keep_detail=keep_detail,
                ),
                output_type=output_type,
                condition_batch_size=condition_batch_size,
                score_transfer=score_transfer,
            )
        )
        sampling = inputs.sampling

        # 2. Encode: the text condition, the null text, and the attribute references
        text = self.encode_text(inputs.prompt)
        conditions = self.encode_attributes(inputs.references)

        # 3. Prepare latents: noise, or the base image noised to the first of the remaining timesteps
        if sampling.image is None:
            latents = self.prepare_latents(
                sampling.num_images_per_prompt,
                self.transformer.config.in_channels // 4,
                sampling.height,
                sampling.width,
                self.transformer.dtype,
                self._execution_device,
                sampling.generator,
                sampling.latents,
            )  # (B, S, 4 * C_lat)
            timesteps = self.prepare_timesteps(sampling.num_inference_steps, latents.shape[1])
        else:
            image_seq_len = (sampling.height // (self.vae_scale_factor * 2)) * (
                sampling.width // (self.vae_scale_factor * 2)
            )
            timesteps = self.prepare_timesteps(sampling.num_inference_steps, image_seq_len, sampling.strength)
            latents = self.prepare_image_latents(sampling, timesteps[:1])  # (B, S, 4 * C_lat)

        # 4. Denoise: one batched forward over the condition rows per step
        latents = self.denoise(latents, timesteps, text, conditions, inputs)

        # 5. Decode, and score the outputs against the references
        detail = None  # the base's pixels and the sigma of the detail kept from them
        if sampling.keep_detail:
            detail = (self.preprocess_base(sampling.image, sampling.height, sampling.width), sampling.keep_detail)
        images, decoded = self.decode_latents(latents, sampling.height, sampling.width, inputs.output_type, detail)
        scores = self.score_outputs(images, decoded, conditions, inputs)

        self.maybe_free_model_hooks()
        if not return_dict:
            return images, scores
        return AttributePipelineOutput(images=images, transfer_scores=scores, attributes=conditions.attributes)

    # --------------------------------------------------------------------------------------------------------
    # Stages
    # --------------------------------------------------------------------------------------------------------

    def check_inputs(self, inputs: AttributePipelineInputs) -> AttributePipelineInputs:
        """Raise GeneratorInputError naming what to fix; return the inputs with refs as (image, attribute, weight)."""
        self._check_prompt(inputs.prompt)
        refs = self._check_references(inputs.references)
        sampling = self._check_sampling(inputs.sampling)
        if inputs.output_type not in OUTPUT_TYPES:
            raise GeneratorInputError(f"output_type must be one of {OUTPUT_TYPES}; got {inputs.output_type!r}.")
        if sampling.keep_detail and inputs.output_type == "latent":
            raise GeneratorInputError(
                "keep_detail works on the decoded pixels: ask for output_type 'pil', 'np' or 'pt', or leave it out."
            )
        if inputs.condition_batch_size is not None and inputs.condition_batch_size < 1:
            raise GeneratorInputError(
                f"condition_batch_size must be None or at least 1; got {inputs.condition_batch_size}."
            )
        return dataclasses.replace(
            inputs, references=dataclasses.replace(inputs.references, refs=refs), sampling=sampling
        )

    def _check_prompt(self, text: PromptInputs) -> None:
        """The text condition: a prompt or its embeddings (FLUX's shapes), a matching null text, a finite s_c."""
        config = self.transformer.config
        if (text.prompt is None) == (text.prompt_embeds is None):
            raise GeneratorInputError("pass exactly one of prompt (a string) and prompt_embeds.")
        if text.prompt is not None and not isinstance(text.prompt, str):
            raise GeneratorInputError(f"prompt must be one string; got {type(text.prompt).__name__}.")
        if text.prompt_embeds is not None:
            if text.pooled_prompt_embeds is None:
                raise GeneratorInputError("prompt_embeds needs pooled_prompt_embeds as well (FLUX's CLIP vector).")
            _check_embeds("prompt_embeds", text.prompt_embeds, (1, None, config.joint_attention_dim))
            _check_embeds("pooled_prompt_embeds", text.pooled_prompt_embeds, (1, config.pooled_projection_dim))
        negative, negative_pooled = text.negative_prompt_embeds, text.negative_pooled_prompt_embeds
        if (negative is None) != (negative_pooled is None):
            raise GeneratorInputError("pass both negative_prompt_embeds and negative_pooled_prompt_embeds, or neither.")
        if negative is not None:
            _check_embeds("negative_prompt_embeds", negative, (1, None, config.joint_attention_dim))
            _check_embeds("negative_pooled_prompt_embeds", negative_pooled, (1, config.pooled_projection_dim))
            if text.prompt_embeds is not None and negative.shape != text.prompt_embeds.shape:
                raise GeneratorInputError(
                    f"negative_prompt_embeds {tuple(negative.shape)} must have the shape of "
                    f"prompt_embeds {tuple(text.prompt_embeds.shape)} so both run in one batch; pad them to the "
                    "same length."
                )
        if not math.isfinite(text.guidance_scale):
            raise GeneratorInputError(f"guidance_scale must be a finite float; got {text.guidance_scale}.")

    def _check_references(self, references: ReferenceInputs) -> list[tuple[PIL.Image.Image, str, float]] | None:
        """Image triples or precomputed tokens + weights (not both), at most MAX_REFERENCES, and an adapter."""
        refs = references.refs
        attribute_tokens = references.attribute_tokens
        attribute_weights = references.attribute_weights
        if refs is not None and attribute_tokens is not None:
            raise GeneratorInputError("pass either refs (images to encode) or attribute_tokens, not both.")
        normalised = None
        if refs is not None:
            normalised = [_check_reference(ref, position) for position, ref in enumerate(refs)]
            num_refs = len(normalised)
        elif attribute_tokens is not None:
            if not isinstance(attribute_tokens, torch.Tensor) or attribute_tokens.ndim != 3:
                raise GeneratorInputError(
                    "attribute_tokens must be a (N, l, d_ctx) tensor: one row of encoder tokens "
                    "(AttributeEmbeddings.tokens) per reference."
                )
            num_refs = attribute_tokens.shape[0]
            if attribute_weights is None:
                raise GeneratorInputError("attribute_tokens need attribute_weights: one weight w_i per reference row.")
            if len(attribute_weights) != num_refs:
                raise GeneratorInputError(
                    f"got {len(attribute_weights)} attribute_weights for {num_refs} references (rows of "
                    "attribute_tokens); pass exactly one weight per reference."
                )
            for position, weight in enumerate(attribute_weights):
                _check_weight(weight, position)
        else:
            if attribute_weights is not None:
                raise GeneratorInputError("attribute_weights were given without attribute_tokens.")
            num_refs = 0
        if num_refs > MAX_REFERENCES:
            raise GeneratorInputError(
                f"{num_refs} references given; at most {MAX_REFERENCES} are supported (each adds a "
                "transformer row per step). Drop or merge references."
            )
        if normalised and references.encoder is None:
            raise GeneratorInputError(
                "image references need an attribute encoder: pass attribute_encoder=, set "
                "pipeline.attribute_encoder, or pass precomputed attribute_tokens."
            )
        if num_refs > 0:
            if self.attribute_adapter is None:
                raise GeneratorInputError(
                    "attribute references need an attribute adapter: call load_attribute_adapter() first."
                )
            if attribute_tokens is not None:
                check_attribute_tokens(attribute_tokens, self.attribute_adapter.config.token_dim)
        return normalised

    def _check_sampling(self, sampling: SamplingInputs) -> SamplingInputs:
        """Output size on the latent grid, at least one step and image, latents packed for that size, a base
        image with a strength in (0, 1]; returns the sampling inputs with the strength as a float."""
        multiple = self.vae_scale_factor * 2
        height, width = sampling.height, sampling.width
        if height % multiple or width % multiple:
            raise GeneratorInputError(f"height and width must be multiples of {multiple}; got {height}x{width}.")
        if sampling.num_inference_steps < 1 or sampling.num_images_per_prompt < 1:
            raise GeneratorInputError("num_inference_steps and num_images_per_prompt must be at least 1.")
        if sampling.latents is not None:
            expected = (
                sampling.num_images_per_prompt,
                (height // multiple) * (width // multiple),
                self.transformer.config.in_channels,
            )
            if tuple(sampling.latents.shape) != expected:
                raise GeneratorInputError(
                    f"latents must be packed with shape {expected}; got {tuple(sampling.latents.shape)}."
                )
        return dataclasses.replace(sampling, strength=_check_base(sampling), keep_detail=_check_detail(sampling))

    def encode_text(self, text: PromptInputs) -> _TextConditions:
        """The prompt's embeddings (encoded here from a prompt string) and the null text's, on the device."""
        device, dtype = self._execution_device, self.transformer.dtype
        prompt_embeds, pooled_prompt_embeds = text.prompt_embeds, text.pooled_prompt_embeds
        if prompt_embeds is None:
            prompt_embeds, pooled_prompt_embeds = self.encode_prompt(text.prompt, text.max_sequence_length)
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)  # (1, T, J)
        pooled_prompt_embeds = pooled_prompt_embeds.to(device=device, dtype=dtype)  # (1, P_text)
        negative_prompt_embeds, negative_pooled_prompt_embeds = (
            text.negative_prompt_embeds,
            text.negative_pooled_prompt_embeds,
        )
        if negative_prompt_embeds is None:
            negative_prompt_embeds = torch.zeros_like(prompt_embeds)
            negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
        if negative_prompt_embeds.shape != prompt_embeds.shape:
            raise GeneratorInputError(
                f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must have the shape of the "
                f"prompt's embeddings {tuple(prompt_embeds.shape)}; encode both with one max_sequence_length."
            )
        return _TextConditions(
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds.to(device=device, dtype=dtype),  # (1, T, J)
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds.to(device=device, dtype=dtype),
        )

    def encode_attributes(self, references: ReferenceInputs) -> _AttributeConditions:
        """Encode checked (image, attribute, weight) references with the encoder, or take precomputed tokens.

        Every weight is multiplied by the adapter's calibrated `weight_gain` (1 unless the adapter sets it)."""
        if references.refs:
            images = [image for image, _, _ in references.refs]
            attributes = [attribute for _, attribute, _ in references.refs]
            embeddings = references.encoder.encode(images, attributes)
            # (N, l, d_ctx), or (N, l + 1, d_ctx) with the pooled vector for an adapter trained with it
            tokens = self.attribute_adapter.condition_tokens(embeddings.tokens, embeddings.pooled)
            check_attribute_tokens(tokens, self.attribute_adapter.config.token_dim)
            weights = self._gained(weight for _, _, weight in references.refs)
            return _AttributeConditions(tokens, weights, attributes, embeddings.pooled)
        if references.attribute_tokens is not None and len(references.attribute_tokens):
            weights = self._gained(references.attribute_weights)
            return _AttributeConditions(references.attribute_tokens, weights, None, None)
        return _AttributeConditions(None, [], None, None)

    def _gained(self, weights) -> list[float]:
        """The user's reference weights times the adapter's weight gain: the w_i of the guidance rule."""
        gain = self.attribute_adapter.config.weight_gain
        return [float(weight) * gain for weight in weights]

    def prepare_latents(
        self, batch_size, num_latent_channels, height, width, dtype, device, generator, latents=None
    ) -> torch.Tensor:
        """Gaussian noise packed to FLUX's token layout: (B, C, h, w) -> (B, h/2 * w/2, 4 C)."""
        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        latent_height = 2 * (height // (self.vae_scale_factor * 2))
        latent_width = 2 * (width // (self.vae_scale_factor * 2))
        shape = (batch_size, num_latent_channels, latent_height, latent_width)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)  # (B, C, h, w)
        return self.pack_latents(noise)

    @staticmethod
    def pack_latents(latents: torch.Tensor) -> torch.Tensor:
        """FLUX's token layout: 2x2 latent patches per token, (B, C, h, w) -> (B, h/2 * w/2, 4 C)."""
        batch_size, num_latent_channels, latent_height, latent_width = latents.shape
        patches = latents.view(batch_size, num_latent_channels, latent_height // 2, 2, latent_width // 2, 2)
        patches = patches.permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
        return patches.reshape(batch_size, (latent_height // 2) * (latent_width // 2), num_latent_channels * 4)

    def unpack_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Inverse of the packing in prepare_latents: (B, h/2 * w/2, 4 C) -> (B, C, h, w)."""
        batch_size, _, packed_channels = latents.shape
        latent_height = 2 * (height // (self.vae_scale_factor * 2))
        latent_width = 2 * (width // (self.vae_scale_factor * 2))
        patches = latents.view(batch_size, latent_height // 2, latent_width // 2, packed_channels // 4, 2, 2)
        patches = patches.permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
        return patches.reshape(batch_size, packed_channels // 4, latent_height, latent_width)

    def build_condition_rows(
        self, conditions: _AttributeConditions, text: _TextConditions, guidance_scale: float, num_images: int
    ) -> dict[str, Any]:
        """The transformer batch for one step: condition rows [D(0,0), D(0,c), D(A_1,0) .. D(A_N,0)] x images.

        Row r * num_images + b is condition r for image b. With no references and no text guidance, only
        D(0, c) runs.
        """
        prompt_embeds, pooled_prompt_embeds = text.prompt_embeds, text.pooled_prompt_embeds  # (1, T, J), (1, P_text)
        negative_prompt_embeds, negative_pooled_prompt_embeds = (
            text.negative_prompt_embeds,
            text.negative_pooled_prompt_embeds,
        )
        num_refs = len(conditions.weights)
        if num_refs == 0 and guidance_scale == 1.0:
            return {
                "num_conditions": 1,
                "prompt_embeds": prompt_embeds.repeat(num_images, 1, 1),
                "pooled_prompt_embeds": pooled_prompt_embeds.repeat(num_images, 1),
                "ip_hidden_states": None,
                "attribute_mask": None,
            }
        null_text_rows = [negative_prompt_embeds, prompt_embeds] + [negative_prompt_embeds] * num_refs
        null_pooled_rows = [negative_pooled_prompt_embeds, pooled_prompt_embeds] + [
            negative_pooled_prompt_embeds
        ] * num_refs
        rows = {
            "num_conditions": num_refs + 2,
            "prompt_embeds": torch.cat(null_text_rows).repeat_interleave(num_images, dim=0),  # (R B, T, J)
            "pooled_prompt_embeds": torch.cat(null_pooled_rows).repeat_interleave(num_images, dim=0),  # (R B, P)
            "ip_hidden_states": None,
            "attribute_mask": None,
        }
        if num_refs:
            tokens = conditions.tokens.to(prompt_embeds.device)  # (N, l, d_ctx)
            null_tokens = tokens.new_zeros(2, *tokens.shape[1:])  # rows D(0, 0) and D(0, c)
            tokens = torch.cat([null_tokens, tokens])  # (R, l, d_ctx)
            mask = torch.tensor([0.0, 0.0] + [1.0] * num_refs, device=prompt_embeds.device)  # (R,)
            projected = self.attribute_adapter.project_tokens(tokens)  # (R, l, P), once for all steps
            rows["ip_hidden_states"] = projected.repeat_interleave(num_images, dim=0)  # (R B, l, P)
            rows["attribute_mask"] = mask.repeat_interleave(num_images)  # (R B,)
        return rows

    def denoise(
        self,
        latents: torch.Tensor,  # (B, S, 4 * C_lat)
        timesteps: torch.Tensor,
        text: _TextConditions,
        conditions: _AttributeConditions,
        inputs: AttributePipelineInputs,
    ) -> torch.Tensor:
        """Run the schedule: per step one batched transformer forward over the condition rows, then guidance."""
        sampling, guidance_scale = inputs.sampling, inputs.prompt.guidance_scale
        num_images = sampling.num_images_per_prompt
        device, dtype = self._execution_device, self.transformer.dtype
        latent_image_ids = self.prepare_latent_image_ids(sampling.height, sampling.width)  # (S, 3)
        text_ids = torch.zeros(text.prompt_embeds.shape[1], 3, device=device, dtype=dtype)  # (T, 3)
        rows = self.build_condition_rows(conditions, text, guidance_scale, num_images)
        num_rows = rows["num_conditions"]
        chunk = inputs.condition_batch_size or num_rows
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((num_rows * num_images,), sampling.embedded_guidance_scale, device=device)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for t in timesteps:
                model_input = latents.repeat(num_rows, 1, 1)  # (R * B, S, 4 * C_lat), row r * B + b
                timestep = t.expand(model_input.shape[0]).to(dtype) / 1000
                velocities = []
                for start in range(0, num_rows, chunk):
                    rows_slice = slice(start * num_images, min(start + chunk, num_rows) * num_images)
                    attention_kwargs = None
                    if rows["ip_hidden_states"] is not None:
                        attention_kwargs = {
                            "ip_hidden_states": rows["ip_hidden_states"][rows_slice],
                            "ip_adapter_masks": rows["attribute_mask"][rows_slice],
                        }
                    velocity = self.transformer(
                        hidden_states=model_input[rows_slice],
                        timestep=timestep[rows_slice],
                        guidance=None if guidance is None else guidance[rows_slice],
                        pooled_projections=rows["pooled_prompt_embeds"][rows_slice],
                        encoder_hidden_states=rows["prompt_embeds"][rows_slice],
                        txt_ids=text_ids,
                        img_ids=latent_image_ids,
                        joint_attention_kwargs=attention_kwargs,
                        return_dict=False,
                    )[0]
                    velocities.append(velocity)
                velocity = torch.cat(velocities).view(num_rows, *latents.shape)  # (R, B, S, 4 * C_lat)
                # (B, S, 4 * C_lat)
                guided = self.combine_velocities(velocity, guidance_scale, conditions.weights)
                latents = self.scheduler.step(guided, t, latents, return_dict=False)[0]
                progress_bar.update()
        return latents

    def decode_latents(
        self,
        latents: torch.Tensor,
        height: int,
        width: int,
        output_type: str,
        detail: tuple[torch.Tensor, float] | None = None,
    ) -> tuple[list[PIL.Image.Image] | np.ndarray | torch.Tensor, torch.Tensor | None]:
        """Packed latents -> images of `output_type`, and the decoded (B, 3, H, W) tensor (None for "latent").

        detail: (base pixels (1, 3, H, W) in [-1, 1], sigma): keep the base's detail finer than sigma
        (`keep_base_detail`).
        """
        if output_type == "latent":
            return latents, None
        unpacked = self.unpack_latents(latents, height, width)  # (B, C_lat, h, w)
        unpacked = unpacked / self.vae.config.scaling_factor + self.vae.config.shift_factor
        decoded = self.vae.decode(unpacked.to(self.vae.dtype)).sample  # (B, 3, H, W) in [-1, 1]
        if detail is not None:
            decoded = keep_base_detail(decoded, *detail)
        return self.image_processor.postprocess(decoded, output_type=output_type), decoded

    def score_outputs(
        self,
        images: list[PIL.Image.Image] | np.ndarray | torch.Tensor,
        decoded: torch.Tensor | None,
        conditions: _AttributeConditions,
        inputs: AttributePipelineInputs,
    ) -> torch.Tensor | None:
        """Transfer scores (B, N) of the outputs when asked for and the references were images, else None."""
        if not inputs.score_transfer or decoded is None or conditions.reference_pooled is None:
            return None
        pil_images = images if inputs.output_type == "pil" else self.image_processor.postprocess(decoded, "pil")
        return transfer_scores(
            inputs.references.encoder, pil_images, conditions.attributes, conditions.reference_pooled
        )

    @staticmethod
    def combine_velocities(velocity: torch.Tensor, guidance_scale: float, weights: Sequence[float]) -> torch.Tensor:
        """(R, B, S, C) condition velocities -> guided (B, S, C) by the rule in the module docstring."""
        if velocity.shape[0] == 1:
            return velocity[0]  # D(0, c) alone: no references, no text guidance
        null, text = velocity[0], velocity[1]  # D(0, 0), D(0, c)
        guided = null + guidance_scale * (text - null)
        for index, weight in enumerate(weights):
            guided = guided + weight * (velocity[2 + index] - null)  # w_i (D(A_i, 0) - D(0, 0))
        return guided


def _check_reference(ref: Any, position: int) -> tuple[PIL.Image.Image, str, float]:
    if not isinstance(ref, (tuple, list)) or len(ref) != 3:
        raise GeneratorInputError(f"reference {position} must be an (image, attribute, weight) triple; got {ref!r}.")
    image, attribute, weight = ref
    if not isinstance(image, PIL.Image.Image):
        raise GeneratorInputError(f"reference {position}: the image must be a PIL.Image; got {type(image).__name__}.")
    if not isinstance(attribute, str) or not attribute.strip():
        raise GeneratorInputError(f"reference {position}: the attribute must be a non-empty string; got {attribute!r}.")
    return image, attribute, _check_weight(weight, position)


def first_step(num_inference_steps: int, strength: float) -> int:
    """Index of the first step that runs at `strength` (FluxImg2ImgPipeline.get_timesteps): 0 at strength 1."""
    return int(max(num_inference_steps - min(num_inference_steps * strength, num_inference_steps), 0))


def _check_base(sampling: SamplingInputs) -> float:
    """The strength to use: a number in (0, 1] that leaves a step to run; a base image that is a PIL image."""
    image, strength = sampling.image, sampling.strength
    if image is not None and not isinstance(image, PIL.Image.Image):
        raise GeneratorInputError(
            f"image (the base to start from) must be a PIL.Image; got {type(image).__name__}. "
            "Open a file with PIL.Image.open(path).convert('RGB')."
        )
    if image is not None and sampling.latents is not None:
        raise GeneratorInputError("pass either latents (the noise to start from) or a base image, not both.")
    if strength is None:
        return 1.0 if image is None else DEFAULT_BASE_STRENGTH
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise GeneratorInputError(
            f"strength must be a number in (0, 1]; got {strength!r}. Small values keep the base image, "
            "1.0 starts from pure noise."
        )
    if image is None and strength != 1:
        raise GeneratorInputError(f"strength {strength} needs a base image: pass image= (or leave strength out).")
    if first_step(sampling.num_inference_steps, strength) >= sampling.num_inference_steps:
        raise GeneratorInputError(
            f"strength {strength} leaves none of the {sampling.num_inference_steps} steps to run; raise strength "
            f"to at least {1 / sampling.num_inference_steps:.3g} or raise num_inference_steps."
        )
    return float(strength)


def _check_detail(sampling: SamplingInputs) -> float:
    """The sigma of the base detail to keep: 0.0 (off) or a number in (0, MAX_KEEP_DETAIL] with a base image."""
    sigma = sampling.keep_detail
    if sigma is None:
        return 0.0
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma <= MAX_KEEP_DETAIL:
        raise GeneratorInputError(
            f"keep_detail must be a number in [0, {MAX_KEEP_DETAIL}] (a blur sigma in output pixels; 0 turns it "
            f"off); got {sigma!r}."
        )
    if sigma and sampling.image is None:
        raise GeneratorInputError(
            f"keep_detail {sigma} keeps a base image's detail: pass image= (or leave keep_detail out)."
        )
    return float(sigma)


def gaussian_blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, C, H, W) -> the same blurred by a Gaussian of std `sigma` pixels (separable, reflected borders)."""
    radius = min(math.ceil(3 * sigma), pixels.shape[-2] - 1, pixels.shape[-1] - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=pixels.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(pixels.dtype)  # (2r + 1,)
    channels = pixels.shape[1]
    padded = F.pad(pixels, (radius, radius, radius, radius), mode="reflect")  # (B, C, H + 2r, W + 2r)
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)  # (B, C, H, W)


def keep_base_detail(decoded: torch.Tensor, base: torch.Tensor, sigma: float) -> torch.Tensor:
    """blur(decoded) + base - blur(base), clamped to [-1, 1]: the outputs' content coarser than `sigma` pixels
    with the base's finer detail. decoded (B, 3, H, W) and base (1, 3, H, W), both in [-1, 1]."""
    base = base.to(decoded.dtype)
    return (gaussian_blur(decoded, sigma) + base - gaussian_blur(base, sigma)).clamp(-1.0, 1.0)


def _check_weight(weight: Any, position: int) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise GeneratorInputError(f"reference {position}: the weight must be a finite number; got {weight!r}.")
    return float(weight)


def _check_embeds(name: str, tensor: Any, shape: tuple[int | None, ...]) -> None:
    expected = "(" + ", ".join("T" if size is None else str(size) for size in shape) + ")"
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != len(shape):
        raise GeneratorInputError(f"{name} must be a tensor of shape {expected}; got {type(tensor).__name__}.")
    for size, want in zip(tensor.shape, shape, strict=True):
        if want is not None and size != want:
            raise GeneratorInputError(f"{name} must have shape {expected}; got {tuple(tensor.shape)}.")
