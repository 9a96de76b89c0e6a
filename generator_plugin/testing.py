"""Tiny random generators built in code: for tests, benchmarks and the training issue's smoke runs.

Nothing is downloaded; every model comes from a config and a seed. The global torch RNG is left untouched.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from generator_plugin.adapter import AttributeAdapter
from generator_plugin.pipeline import AttributePipeline

TINY_JOINT_ATTENTION_DIM = 32
TINY_POOLED_PROJECTION_DIM = 32


def tiny_transformer(
    seed: int = 0,
    num_layers: int = 2,
    num_single_layers: int = 1,
    guidance_embeds: bool = False,
) -> FluxTransformer2DModel:
    """A FluxTransformer2DModel of about 0.1 M parameters: 2 heads x 16, 4 latent channels packed 2x2."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels x 2x2 packing
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TINY_JOINT_ATTENTION_DIM,
            pooled_projection_dim=TINY_POOLED_PROJECTION_DIM,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        ).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """An AutoencoderKL with 4 latent channels and 8x downsampling (64x64 image -> 4x8x8 latent)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            sample_size=64,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,
            shift_factor=0.1159,
        ).eval()


def randomize_attribute_adapter(adapter: AttributeAdapter, seed: int = 0, std: float = 0.3) -> AttributeAdapter:
    """Give the zero-initialised key/value projections random weights, standing in for a trained adapter."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for processor in adapter.processors.values():
            for linear in (processor.to_k_ip, processor.to_v_ip):
                linear.weight.normal_(0.0, std)
                linear.bias.normal_(0.0, std)
    return adapter


def tiny_generator(
    seed: int = 0,
    token_dim: int | None = 32,
    adapter_blocks: list[int] | None = None,
    random_adapter: bool = True,
    num_layers: int = 2,
    num_single_layers: int = 1,
    guidance_embeds: bool = False,
) -> AttributePipeline:
    """An AttributePipeline over a tiny random transformer and VAE (64x64 images by default).

    token_dim: the encoder token width d_ctx the adapter takes; None builds no adapter.
    random_adapter: random key/value weights (visible effect) instead of the zero initialisation.
    """
    transformer = tiny_transformer(seed, num_layers, num_single_layers, guidance_embeds)
    pipeline = AttributePipeline(
        transformer=transformer, vae=tiny_vae(seed), scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0)
    )
    pipeline.set_progress_bar_config(disable=True)
    if token_dim is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            adapter = AttributeAdapter.for_transformer(transformer, token_dim, blocks=adapter_blocks)
        if random_adapter:
            randomize_attribute_adapter(adapter, seed + 2)
        pipeline.load_attribute_adapter(adapter)
    return pipeline


def tiny_prompt_embeds(
    pipeline: AttributePipeline, seed: int = 0, sequence_length: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random stand-ins for text-encoder output: (1, T, joint_dim) and (1, pooled_dim)."""
    config = pipeline.transformer.config
    generator = torch.Generator().manual_seed(seed)
    prompt_embeds = torch.randn(1, sequence_length, config.joint_attention_dim, generator=generator)
    pooled_prompt_embeds = torch.randn(1, config.pooled_projection_dim, generator=generator)
    return prompt_embeds, pooled_prompt_embeds


def random_attribute_tokens(num_refs: int, num_tokens: int = 4, token_dim: int = 32, seed: int = 0) -> torch.Tensor:
    """Random stand-ins for encoder tokens (N, l, d_ctx)."""
    return torch.randn(num_refs, num_tokens, token_dim, generator=torch.Generator().manual_seed(seed))


def tiny_text_encoders(seed: int = 0, max_length: int = 16) -> dict:
    """Tiny random FLUX text encoders with word-level tokenizers: CLIP (pooled 32) and T5 (width 32).

    Returns the four optional components of AttributePipeline (text_encoder, tokenizer, text_encoder_2,
    tokenizer_2), sized for `tiny_transformer`.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = [
        "<pad>",
        "<unk>",
        "<eos>",
        "a",
        "an",
        "the",
        "dog",
        "cat",
        "man",
        "woman",
        "photo",
        "of",
        "in",
        "on",
    ]
    words += ["red", "blue", "green", "light", "dark"]
    vocab = {word: index for index, word in enumerate(words)}

    def tokenizer() -> PreTrainedTokenizerFast:
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.normalizer = normalizers.Lowercase()
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            pad_token="<pad>",
            unk_token="<unk>",
            eos_token="<eos>",
            model_max_length=max_length,
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=TINY_POOLED_PROJECTION_DIM,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=max_length,
                pad_token_id=0,
                eos_token_id=2,
                bos_token_id=2,
            )
        ).eval()
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(vocab),
                d_model=TINY_JOINT_ATTENTION_DIM,
                d_kv=16,
                d_ff=64,
                num_layers=1,
                num_heads=2,
                pad_token_id=0,
                eos_token_id=2,
            )
        ).eval()
    return {"text_encoder": clip, "tokenizer": tokenizer(), "text_encoder_2": t5, "tokenizer_2": tokenizer()}


def random_flux_generator(
    token_dim: int = 4096,
    double_blocks: int = 19,
    single_blocks: int = 38,
    heads: int = 24,
    vae_channels: tuple[int, int, int, int] = (128, 256, 512, 512),
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> AttributePipeline:
    """A randomly initialised generator with FLUX.1-dev's shapes (defaults), built on `device` in `dtype`.

    Defaults: 19 double + 38 single blocks, 24 heads x 128, joint_attention_dim 4096, pooled 768, guidance
    embedding, 16-channel VAE; an attribute adapter on every double block for `token_dim`-wide tokens. Smaller
    `double_blocks` / `single_blocks` / `heads` / `vae_channels` keep the same code path runnable on a CPU.
    """
    previous_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)  # initialise in the target dtype: no float32 copy of 12 B parameters
        try:
            transformer = FluxTransformer2DModel(
                patch_size=1,
                in_channels=64,
                num_layers=double_blocks,
                num_single_layers=single_blocks,
                attention_head_dim=128,
                num_attention_heads=heads,
                joint_attention_dim=4096,
                pooled_projection_dim=768,
                guidance_embeds=True,
                axes_dims_rope=(16, 56, 56),
            ).eval()
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                latent_channels=16,
                layers_per_block=2,
                norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=vae_channels,
                sample_size=1024,
                use_quant_conv=False,
                use_post_quant_conv=False,
                scaling_factor=0.3611,
                shift_factor=0.1159,
            ).eval()
            adapter = randomize_attribute_adapter(
                AttributeAdapter.for_transformer(transformer, token_dim), seed=seed + 1, std=0.02
            )
        finally:
            torch.set_default_dtype(previous_dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipeline = AttributePipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipeline.load_attribute_adapter(adapter)
    return pipeline
