"""Pretrain the small starter generator on the procedural corpus, then its attribute adapter against it.

Stages, each seeded and bounded by a time budget, all on a CPU:

    python -m training.generator_pretrain base --data DIR --out GEN_DIR [--vae-seconds S --transformer-seconds S]
    python -m training.generator_pretrain decoder --data DIR --generator GEN_DIR --out GEN_DIR2 [--seconds S]
    python -m training.generator_pretrain transformer --data DIR --generator GEN_DIR --out GEN_DIR2 --size PX
    python -m training.generator_pretrain adapter --data DIR --generator GEN_DIR --encoder ENC_DIR
    python -m training.generator_pretrain samples --data DIR --generator GEN_DIR --out GRID.png

`base`: (1) an AutoencoderKL, 64 x 64 RGB -> 8 x 8 x 8 latents, MSE + a small KL term; its latent mean and
std become `shift_factor` / `scaling_factor`; (2) a FluxTransformer2DModel with flow matching on (image,
caption) examples, both sides of every pair. Text features come from frozen, randomly initialised CLIP / T5
text encoders over a word-level vocabulary of the corpus' captions: a fixed deterministic function of the
caption, which the transformer learns to read. The result is a diffusers-layout directory that
`generator_plugin.plugins.load_generator("flux", GEN_DIR)` loads.

`decoder`: the VAE's decoder alone, fine-tuned with perceptual and style distances in the frozen ImageNet trunk
on top of the pixel MSE, the encoder frozen: the latent space does not move, so the transformer and the adapter
trained on it keep working with the sharper decoder.

`transformer`: the transformer continued at a new output size (the convolutional VAE unchanged); the size becomes
the copy's default output side, and its adapter should then be continued at that size (`adapter --size`).

`adapter`: the attribute adapter with L_gen (the trainer's objective: the target's flow-matching velocity under
its caption, conditioned on E(reference, all its positives), condition dropout as the pipeline drops
conditions) with the encoder frozen, so its tokens, the target latents and the caption features are computed
once and every step runs only the transformer. `training.trainer` trains the same objective with the encoder
unfrozen (L_gen + L_con), at the cost of an encoder forward and backward per step. Pairs that carry base images
(realpairs --bases) also train apply-to-my-image: from the target's base noised to an img2img start sigma to the
target (losses.bridge_inputs), so the adapter learns to replace the base's attribute with the reference's.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from generator_plugin.adapter import AttributeAdapter
from generator_plugin.pipeline import AttributePipeline
from training.data.pairs import PairRecord, load_pairs
from training.data.procedural import FACTORS
from training.loop import BatchLoss, run_steps
from training.losses import bridge_inputs, flow_matching_inputs, flow_matching_loss, sample_sigmas
from training.trainer import pack_latents

PRETRAIN_CONFIG_NAME = "pretrain_config.json"
SPECIAL_TOKENS = ("<pad>", "<unk>")
EOS_TOKEN = "<eos>"
WORD_PATTERN = re.compile(r"\w+")  # the words the tokenizer keeps: punctuation is dropped (shorter sequences)


# ---------------------------------------------------------------------------------------------------------
# Parts


def caption_vocabulary(captions: Sequence[str]) -> list[str]:
    """Word-level vocabulary: special tokens, every lower-cased word of the captions and factor phrases, <eos> last.

    <eos> is the highest id so CLIP's pooled output (taken at the eos position; the legacy argmax rule picks the
    highest id) is the caption's end whatever the rule.
    """
    texts = list(captions)
    for factor in FACTORS.values():
        texts += [factor.describe(value) for value in factor.values()]
    words = sorted({word for text in texts for word in WORD_PATTERN.findall(text.lower())})
    return [*SPECIAL_TOKENS, *words, EOS_TOKEN]


def caption_text_encoders(vocabulary: Sequence[str], seed: int = 0, max_length: int = 64, width: int = 32) -> dict:
    """Frozen random CLIP (pooled `width`) and T5 (sequence `width`) text encoders over `vocabulary`.

    The sizes of generator_plugin.testing.tiny_text_encoders, with a vocabulary that covers the captions and an
    <eos> appended to every text. Returns the pipeline's text_encoder, tokenizer, text_encoder_2, tokenizer_2.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {word: index for index, word in enumerate(vocabulary)}
    eos_id = vocab[EOS_TOKEN]

    def tokenizer() -> PreTrainedTokenizerFast:
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.normalizer = normalizers.Sequence(
            [normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), " ")]
        )
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        backend.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, eos_id)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            pad_token="<pad>",
            unk_token="<unk>",
            eos_token=EOS_TOKEN,
            model_max_length=max_length,
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=max_length,
                pad_token_id=0,
                eos_token_id=eos_id,
                bos_token_id=eos_id,
            )
        ).eval()
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(vocab),
                d_model=width,
                d_kv=16,
                d_ff=2 * width,
                num_layers=1,
                num_heads=2,
                pad_token_id=0,
                eos_token_id=eos_id,
            )
        ).eval()
    return {"text_encoder": clip, "tokenizer": tokenizer(), "text_encoder_2": t5, "tokenizer_2": tokenizer()}


def build_vae(
    seed: int = 0,
    channels: Sequence[int] = (32, 64, 64),
    latent_channels: int = 4,
    size: int = 64,
    norm_groups: int = 1,
) -> AutoencoderKL:
    """AutoencoderKL with 2^(len(channels) - 1) downsampling: (32, 64, 64) maps 64 x 64 RGB to 4 x 16 x 16.

    `size` (the training resolution) is recorded as `sample_size`, which the adapter stage reads back.
    `norm_groups`: GroupNorm groups. One group normalises over all channels and keeps their ratios; as many groups
    as the first level has channels (8 on 8, the earlier setting) is an instance norm that removes each feature
    map's mean, and on flat colours it learnt half as much of the colour (tests/training, bench/RESULTS.md
    "Why the 128 px generator is grey").
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=latent_channels,
            layers_per_block=1,
            norm_num_groups=norm_groups,
            down_block_types=("DownEncoderBlock2D",) * len(channels),
            up_block_types=("UpDecoderBlock2D",) * len(channels),
            block_out_channels=tuple(channels),
            sample_size=size,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )


def build_transformer(
    seed: int = 0,
    latent_channels: int = 4,
    num_layers: int = 4,
    num_single_layers: int = 4,
    heads: int = 4,
    head_dim: int = 32,
    text_width: int = 32,
) -> FluxTransformer2DModel:
    """A small FluxTransformer2DModel: hidden heads x head_dim, 2x2-packed latents, no guidance embedding."""
    rope_rows = 3 * head_dim // 8 // 2 * 2  # RoPE axes (text index, row, column): even, summing to head_dim
    rope = (head_dim - 2 * rope_rows, rope_rows, rope_rows)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=text_width,
            pooled_projection_dim=text_width,
            guidance_embeds=False,
            axes_dims_rope=rope,
        )


# ---------------------------------------------------------------------------------------------------------
# Data


def load_image(path: Path, size: int) -> torch.Tensor:
    """One RGB image as uint8 (3, size, size), resized with Lanczos as the pipeline's image processor does."""
    image = PIL.Image.open(path).convert("RGB").resize((size, size), PIL.Image.LANCZOS)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, H, W)


def load_examples(data_dir: str | Path, size: int, max_pairs: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Both sides of every pair as (image, caption) examples: uint8 (2P, 3, size, size) and 2P captions."""
    root = Path(data_dir)
    records = load_pairs(root, verify_images=False).records[:max_pairs]
    images, captions = [], []
    for record in records:
        for image, caption in ((record.image_x, record.caption_x), (record.image_y, record.caption_y)):
            images.append(load_image(root / image, size))
            captions.append(caption)
    return torch.stack(images), captions


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1], the VAE's input range."""
    return images.float() / 127.5 - 1.0


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Normalised, packed latent means: uint8 (N, 3, H, W) -> (N, S, 4 C) with the VAE's shift and scale."""
    chunks = []
    for start in range(0, len(images), batch_size):
        mean = vae.encode(to_unit_range(images[start : start + batch_size])).latent_dist.mean  # (b, C, h, w)
        chunks.append(pack_latents((mean - vae.config.shift_factor) * vae.config.scaling_factor))
    return torch.cat(chunks)


@torch.no_grad()
def embed_captions(
    pipeline: AttributePipeline, captions: Sequence[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen text features of each distinct caption: (N, T, J) T5 sequence and (N, P) CLIP vector."""
    sequences, vectors = [], []
    for caption in captions:
        sequence, vector = pipeline.encode_prompt(caption, max_sequence_length=max_length)
        sequences.append(sequence)
        vectors.append(vector)
    return torch.cat(sequences), torch.cat(vectors)


def example_caption_features(
    pipeline: AttributePipeline, captions: Sequence[str], max_text_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """embed_captions for every example's caption, each distinct caption encoded once: (N, T, J) and (N, P)."""
    distinct = list(dict.fromkeys(captions))
    sequences, vectors = embed_captions(pipeline, distinct, max_text_tokens)
    position = {caption: index for index, caption in enumerate(distinct)}
    rows = torch.tensor([position[caption] for caption in captions])
    return sequences[rows], vectors[rows]


# ---------------------------------------------------------------------------------------------------------
# Resuming


class StageCheckpoint:
    """One stage's resumable state in one file: its modules, optimizer, batch-sampling generator, steps, seconds.

    `path` None: nothing is saved or restored (the default, and what the tests of a single call use).
    """

    def __init__(
        self,
        path: Path | None,
        modules: dict[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
    ) -> None:
        self.path, self.modules, self.optimizer, self.generator = path, modules, optimizer, generator

    def restore(self) -> dict:
        """Load the saved state if there is one; returns run_steps' start_step / recorded / elapsed_seconds."""
        if self.path is None or not self.path.exists():
            return {}
        state = torch.load(self.path, weights_only=False)
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        print(json.dumps({"resumed": str(self.path), "step": state["step"]}), flush=True)
        return {"start_step": state["step"], "recorded": state["recorded"], "elapsed_seconds": state["elapsed"]}

    def save(self, step: int, recorded: list[float], elapsed: float) -> None:
        """Write the state atomically (a temporary file renamed over the old one)."""
        if self.path is None:
            return
        state = {
            "modules": {name: module.state_dict() for name, module in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "step": step,
            "recorded": list(recorded),
            "elapsed": elapsed,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        torch.save(state, partial)
        partial.replace(self.path)

    def run_kwargs(self) -> dict:
        """run_steps' resume and checkpoint arguments."""
        return {**self.restore(), "checkpoint": self.save if self.path is not None else None}


def cached(path: Path | None, key: dict, compute):
    """`compute()`'s value, stored at `path` with `key` and read back on a later call with the same key."""
    if path is not None and path.exists():
        stored = torch.load(path, weights_only=False)
        if stored["key"] == key:
            print(json.dumps({"cache": str(path)}), flush=True)
            return stored["value"]
    value = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save({"key": key, "value": value}, partial)
        partial.replace(path)
    return value


# ---------------------------------------------------------------------------------------------------------
# Training loops


def train_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    kl_weight: float = 1e-4,
    seed: int = 0,
    max_seconds: float | None = None,
    log_every: int = 50,
    checkpoint_path: Path | None = None,
) -> list[float]:
    """MSE reconstruction + kl_weight * mean KL; returns the per-step reconstruction MSE."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    resume = StageCheckpoint(checkpoint_path, {"vae": vae}, optimizer, generator).run_kwargs()

    def batch_loss(step: int) -> BatchLoss:
        batch = to_unit_range(images[torch.randint(len(images), (batch_size,), generator=generator)])
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample  # (B, 3, H, W)
        mse = torch.nn.functional.mse_loss(reconstruction, batch)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        return BatchLoss(mse + kl_weight * kl, recorded=mse, extras={"kl": kl})

    vae.train()
    losses = run_steps(
        "vae",
        optimizer,
        batch_loss,
        steps=steps,
        max_seconds=max_seconds,
        log_every=log_every,
        recorded_name="mse",
        **resume,
    )
    vae.eval()
    return losses


class TrunkPerceptualLoss(torch.nn.Module):
    """Perceptual and style distances in the frozen ImageNet EfficientNet-Lite0 trunk (the compact encoder's).

    Pixel MSE averages texture away (a blurred decode costs little MSE); these two terms do not:
    - `perceptual`: LPIPS-style, each level's features unit-normalised over channels at every position, squared
      difference summed over channels and averaged over positions and levels (0 for identical images, at most 4);
    - `style`: each level's per-channel mean and std over positions (the statistics of AdaIN and of the encoder
      floor's style descriptor), squared difference averaged over channels and levels.
    The trunk is frozen and its batch norms folded; gradients flow to the reconstruction only.
    """

    def __init__(self, levels: Sequence[str] = ("stage2", "stage4"), trunk: torch.nn.Module | None = None) -> None:
        super().__init__()
        from encoder.efficientnet_lite import PIXEL_MEAN, PIXEL_STD, load_efficientnet_lite0

        trunk = trunk if trunk is not None else load_efficientnet_lite0().fold_batch_norm()
        self.trunk = trunk.eval().requires_grad_(False)
        self.levels = tuple(levels)
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[-1, 1] images (B, 3, H, W) -> the trunk maps of `levels`."""
        return self.trunk.feature_levels(((images + 1.0) / 2.0 - self.mean) / self.std, self.levels)

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(perceptual, style) distances of two [-1, 1] batches, each a scalar averaged over the batch."""
        with torch.no_grad():
            wanted = [level.detach() for level in self.features(target)]
        perceptual, style = reconstruction.new_zeros(()), reconstruction.new_zeros(())
        for made, want in zip(self.features(reconstruction), wanted, strict=True):
            a, b = _unit_over_channels(made), _unit_over_channels(want)
            perceptual = perceptual + ((a - b) ** 2).sum(dim=1).mean()
            style = style + torch.nn.functional.mse_loss(made.mean(dim=(2, 3)), want.mean(dim=(2, 3)))
            style = style + torch.nn.functional.mse_loss(made.std(dim=(2, 3)), want.std(dim=(2, 3)))
        return perceptual / len(self.levels), style / len(self.levels)


def _unit_over_channels(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> unit length over C at every position (LPIPS' channel normalisation)."""
    return maps / (maps.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)


def finetune_decoder(
    vae: AutoencoderKL,
    images: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 8,
    lr: float = 2e-4,
    perceptual_weight: float = 1.0,
    style_weight: float = 0.0,
    seed: int = 0,
    max_seconds: float | None = None,
    log_every: int = 50,
    checkpoint_path: Path | None = None,
    loss: TrunkPerceptualLoss | None = None,
) -> list[float]:
    """Train the VAE's decoder alone on MSE + perceptual_weight * perceptual + style_weight * style.

    The encoder is frozen, so the latent space stays the one the transformer and the attribute adapter were
    trained in: a sharper decoder can replace the old one without retraining either (as Stable Diffusion's
    fine-tuned decoders did). The decoder sees latents sampled from the encoder's posterior, as in train_vae.
    Returns the per-step pixel MSE.
    """
    loss = loss if loss is not None else TrunkPerceptualLoss()
    generator = torch.Generator().manual_seed(seed)
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.decoder.parameters(), lr=lr, weight_decay=0.0)
    resume = StageCheckpoint(checkpoint_path, {"decoder": vae.decoder}, optimizer, generator).run_kwargs()

    def batch_loss(step: int) -> BatchLoss:
        batch = to_unit_range(images[torch.randint(len(images), (batch_size,), generator=generator)])
        with torch.no_grad():
            posterior = vae.encode(batch).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample  # (B, 3, H, W)
        mse = torch.nn.functional.mse_loss(reconstruction, batch)
        perceptual, style = loss(reconstruction, batch)
        total = mse + perceptual_weight * perceptual + style_weight * style
        return BatchLoss(total, recorded=mse, extras={"perceptual": perceptual, "style": style})

    vae.eval()  # the decoder has no dropout or batch norm: eval and train compute the same
    losses = run_steps(
        "decoder",
        optimizer,
        batch_loss,
        steps=steps,
        max_seconds=max_seconds,
        log_every=log_every,
        recorded_name="mse",
        **resume,
    )
    vae.requires_grad_(False)
    return losses


def chroma(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> each pixel minus the mean of its three channels: the colour without the grey level."""
    return images - images.mean(dim=1, keepdim=True)


@torch.no_grad()
def set_latent_statistics(vae: AutoencoderKL, images: torch.Tensor) -> None:
    """shift_factor = mean and scaling_factor = 1 / std of the latent means, so the flow sees unit variance."""
    _, shift, scale = normalised_latents(vae, images)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)


@torch.no_grad()
def normalised_latents(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Packed latents (N, S, 4 C) normalised by their own mean and std, with that shift_factor and scaling_factor.

    One VAE pass gives both the statistics and the normalised latents (the transformer's training data).
    """
    vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    raw = encode_latents(vae, images)
    shift, scale = float(raw.mean()), float(1.0 / raw.std())
    return (raw - shift) * scale, shift, scale


def flow_step_loss(
    transformer: FluxTransformer2DModel,
    clean: torch.Tensor,  # (B, S, 4 C)
    prompt_embeds: torch.Tensor,  # (B, T, J)
    pooled: torch.Tensor,  # (B, P)
    image_ids: torch.Tensor,  # (S, 3)
    generator: torch.Generator,
    attention_kwargs: dict | None = None,
    bridge: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The flow-matching velocity MSE of one batch (the trainer's L_gen with the conditions given).

    bridge: (base latents (B, S, 4 C), starts (B,) in (0, 1]): row b runs img2img's path from its base noised to
    starts[b] (losses.bridge_inputs) at a sigma drawn uniformly below it; a start of 1 is plain flow matching.
    """
    noise = torch.randn(clean.shape, generator=generator)
    sigmas = sample_sigmas(len(clean), "logit_normal", generator=generator)  # (B,)
    if bridge is None:
        noisy, target = flow_matching_inputs(clean, noise, sigmas)
    else:
        base, starts = bridge
        bridged = starts < 1.0
        below = starts * torch.rand(len(clean), generator=generator).clamp_min(1e-3)  # (B,) in (0, start]
        sigmas = torch.where(bridged, below, sigmas)
        noisy, target = bridge_inputs(clean, base, noise, starts, sigmas)
    predicted = transformer(
        hidden_states=noisy,
        timestep=sigmas,
        pooled_projections=pooled,
        encoder_hidden_states=prompt_embeds,
        txt_ids=torch.zeros(prompt_embeds.shape[1], 3),
        img_ids=image_ids,
        joint_attention_kwargs=attention_kwargs,
        return_dict=False,
    )[0]  # (B, S, 4 C)
    return flow_matching_loss(predicted, target)


def latent_image_ids(num_tokens: int) -> torch.Tensor:
    """RoPE positions (S, 3) of a square grid of packed latent tokens, as AttributePipeline builds them."""
    side = math.isqrt(num_tokens)
    rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).float()


def _drop(keep_probability: float, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(batch_size, generator=generator) < keep_probability).float()  # (B,) 1 = keep


def train_transformer(
    transformer: FluxTransformer2DModel,
    latents: torch.Tensor,  # (N, S, 4 C)
    prompt_embeds: torch.Tensor,  # (N, T, J)
    pooled: torch.Tensor,  # (N, P)
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 5e-4,
    text_dropout: float = 0.15,
    ema_decay: float = 0.995,
    seed: int = 0,
    max_seconds: float | None = None,
    log_every: int = 50,
    checkpoint_path: Path | None = None,
) -> tuple[FluxTransformer2DModel, list[float]]:
    """Flow matching on (latent, caption) examples; the caption is zeroed with p = text_dropout (the null text).

    Returns the EMA copy of the weights (what is shipped) and the per-step losses.
    """
    generator = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    params, ema_params = list(transformer.parameters()), list(ema.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    resume = StageCheckpoint(
        checkpoint_path, {"transformer": transformer, "ema": ema}, optimizer, generator
    ).run_kwargs()
    image_ids = latent_image_ids(latents.shape[1])

    def batch_loss(step: int) -> BatchLoss:
        index = torch.randint(len(latents), (batch_size,), generator=generator)
        keep = _drop(1.0 - text_dropout, batch_size, generator)
        return BatchLoss(
            flow_step_loss(
                transformer,
                latents[index],
                prompt_embeds[index] * keep.view(-1, 1, 1),
                pooled[index] * keep.view(-1, 1),
                image_ids,
                generator,
            )
        )

    def update_ema(step: int) -> None:
        decay = min(ema_decay, (step + 1) / (step + 10))  # short EMA memory early on
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - decay)

    transformer.train()
    losses = run_steps(
        "transformer",
        optimizer,
        batch_loss,
        steps=steps,
        max_seconds=max_seconds,
        log_every=log_every,
        clip_parameters=params,
        lr_at_step=lambda step: lr * min(1.0, (step + 1) / 100),  # 100-step linear warm-up
        after_step=update_ema,
        **resume,
    )
    transformer.eval()
    return ema, losses


def train_adapter(
    pipeline: AttributePipeline,
    reference_tokens: torch.Tensor,  # (N, l, d_ctx) E(reference_n, its positives)
    target_latents: torch.Tensor,  # (N, S, 4 C)
    prompt_embeds: torch.Tensor,  # (N, T, J) the target's caption
    pooled: torch.Tensor,  # (N, P)
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    text_dropout: float = 0.5,
    attribute_dropout: float = 0.1,
    seed: int = 0,
    max_seconds: float | None = None,
    log_every: int = 50,
    checkpoint_path: Path | None = None,
    base_latents: torch.Tensor | None = None,  # (N, S, 4 C) the target's base image; NaN rows: none
    bridge_share: float = 0.5,
    strength_range: tuple[float, float] = (0.5, 0.95),
) -> list[float]:
    """L_gen for the pipeline's adapter with everything else frozen; returns the per-step losses.

    text_dropout is higher than the trainer's default so the adapter learns D(A, 0), the row that personalize
    and compose add to the text's flow field. With base_latents, a share `bridge_share` of the rows that have a
    base train apply-to-my-image instead: start from the base noised to a start sigma drawn in `strength_range`
    and end at the target (flow_step_loss's bridge), so the adapter learns to override the base's attribute.
    """
    transformer, adapter = pipeline.transformer, pipeline.attribute_adapter
    transformer.requires_grad_(False)
    adapter.requires_grad_(True)
    generator = torch.Generator().manual_seed(seed)
    params = list(adapter.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    resume = StageCheckpoint(checkpoint_path, {"adapter": adapter}, optimizer, generator).run_kwargs()
    image_ids = latent_image_ids(target_latents.shape[1])

    has_base = None if base_latents is None else ~base_latents.flatten(1).isnan().any(dim=1)  # (N,)
    low, high = strength_range

    def batch_loss(step: int) -> BatchLoss:
        index = torch.randint(len(target_latents), (batch_size,), generator=generator)
        keep_text = _drop(1.0 - text_dropout, batch_size, generator)
        keep_attribute = _drop(1.0 - attribute_dropout, batch_size, generator)
        bridge = None
        if has_base is not None:
            bridged = has_base[index] & (torch.rand(batch_size, generator=generator) < bridge_share)  # (B,)
            starts = low + (high - low) * torch.rand(batch_size, generator=generator)
            bases = torch.where(bridged.view(-1, 1, 1), base_latents[index].nan_to_num(), target_latents[index])
            bridge = (bases, torch.where(bridged, starts, torch.ones_like(starts)))
        return BatchLoss(
            flow_step_loss(
                transformer,
                target_latents[index],
                prompt_embeds[index] * keep_text.view(-1, 1, 1),
                pooled[index] * keep_text.view(-1, 1),
                image_ids,
                generator,
                attention_kwargs=adapter.attention_kwargs(reference_tokens[index].float(), keep_attribute),
                bridge=bridge,
            )
        )

    losses = run_steps(
        "adapter",
        optimizer,
        batch_loss,
        steps=steps,
        max_seconds=max_seconds,
        log_every=log_every,
        clip_parameters=params,
        **resume,
    )
    adapter.requires_grad_(False)
    return losses


# ---------------------------------------------------------------------------------------------------------
# Stages


def pretrain_base(
    data_dir: str | Path,
    out: str | Path,
    *,
    size: int = 64,
    max_pairs: int | None = None,
    seed: int = 0,
    vae_channels: Sequence[int] = (16, 32, 64, 64),
    vae_norm_groups: int = 1,
    vae_steps: int = 100_000,
    vae_seconds: float | None = 240,
    vae_batch_size: int = 16,
    transformer_layers: tuple[int, int] = (3, 3),
    transformer_heads: int = 4,
    transformer_head_dim: int = 32,
    transformer_steps: int = 100_000,
    transformer_seconds: float | None = 600,
    transformer_batch_size: int = 32,
    transformer_lr: float = 1e-3,
    text_dropout: float = 0.15,
    max_text_tokens: int = 48,
    latent_channels: int = 8,
    work: str | Path | None = None,
) -> dict:
    """VAE then transformer on the pair corpus; saves a loadable generator directory; returns the run's record.

    `work`: a folder for the resized images, the VAE latents and each stage's checkpoint, so that a rerun of
    the same command resumes where the last one stopped (None: keep nothing).
    """
    settings = {key: value for key, value in locals().items() if key not in ("data_dir", "out", "work")}
    settings = {key: list(v) if isinstance(v, tuple) else v for key, v in settings.items()}
    work = Path(work) if work is not None else None
    data_key = {"data": str(Path(data_dir).resolve()), "size": size, "max_pairs": max_pairs}
    images, captions = cached(work and work / "images.pt", data_key, lambda: load_examples(data_dir, size, max_pairs))
    print(json.dumps({"examples": len(images), "size": size}), flush=True)

    vae = build_vae(seed, vae_channels, latent_channels, size, vae_norm_groups)
    vae_losses = train_vae(
        vae,
        images,
        steps=vae_steps,
        batch_size=vae_batch_size,
        seed=seed,
        max_seconds=vae_seconds,
        checkpoint_path=work and work / "vae.ckpt",
    )
    vae.requires_grad_(False)

    text_parts = caption_text_encoders(caption_vocabulary(captions), seed=seed, max_length=max_text_tokens)
    transformer = build_transformer(
        seed, vae.config.latent_channels, *transformer_layers, transformer_heads, transformer_head_dim
    )
    pipeline = AttributePipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), **text_parts
    )
    vae_key = {
        **data_key,
        "seed": seed,
        "vae_steps": len(vae_losses),
        "vae_channels": list(vae_channels),
        "vae_norm_groups": vae_norm_groups,
    }
    latents, shift, scale = cached(work and work / "latents.pt", vae_key, lambda: normalised_latents(vae, images))
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)  # latents: (N, S, 4 C)
    sequences, vectors = example_caption_features(pipeline, captions, max_text_tokens)
    ema, transformer_losses = train_transformer(
        transformer,
        latents,
        sequences,
        vectors,
        steps=transformer_steps,
        batch_size=transformer_batch_size,
        lr=transformer_lr,
        text_dropout=text_dropout,
        seed=seed,
        max_seconds=transformer_seconds,
        checkpoint_path=work and work / "transformer.ckpt",
    )
    pipeline = AttributePipeline(
        transformer=ema, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), **text_parts
    )
    pipeline.save_pretrained(out)
    record = {
        "stage": "base",
        "data_dir": str(data_dir),
        "examples": len(images),
        "settings": settings,
        "vae_steps": len(vae_losses),
        "vae_mse_first_last": [_mean_head(vae_losses), _mean_tail(vae_losses)],
        "transformer_steps": len(transformer_losses),
        "transformer_loss_first_last": [_mean_head(transformer_losses), _mean_tail(transformer_losses)],
    }
    _write_record(Path(out), record)
    return record


def pretrain_decoder(
    data_dir: str | Path,
    generator_dir: str | Path,
    out: str | Path,
    *,
    max_pairs: int | None = None,
    seed: int = 0,
    steps: int = 100_000,
    max_seconds: float | None = 1800,
    batch_size: int = 8,
    lr: float = 2e-4,
    perceptual_weight: float = 1.0,
    style_weight: float = 0.0,
    levels: Sequence[str] = ("stage2", "stage4"),
    work: str | Path | None = None,
) -> dict:
    """Copy a generator to `out` with its VAE decoder fine-tuned (finetune_decoder); everything else unchanged.

    The images are the corpus' pairs at the VAE's sample_size. `work`: cache and checkpoint folder (a rerun
    resumes). The copy's pretrain_config.json keeps the base record and adds this stage's under "decoder".
    """
    settings = {key: value for key, value in locals().items() if key not in ("data_dir", "generator_dir", "out")}
    settings.pop("work")
    settings = {key: list(v) if isinstance(v, tuple) else v for key, v in settings.items()}
    generator_dir, out, work = Path(generator_dir), Path(out), Path(work) if work is not None else None
    vae = AutoencoderKL.from_pretrained(generator_dir / "vae").eval()
    size = vae.config.sample_size
    data_key = {"data": str(Path(data_dir).resolve()), "size": size, "max_pairs": max_pairs}
    images, _ = cached(work and work / "images.pt", data_key, lambda: load_examples(data_dir, size, max_pairs))
    print(json.dumps({"examples": len(images), "size": size}), flush=True)
    losses = finetune_decoder(
        vae,
        images,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        perceptual_weight=perceptual_weight,
        style_weight=style_weight,
        seed=seed,
        max_seconds=max_seconds,
        checkpoint_path=work and work / "decoder.ckpt",
        loss=TrunkPerceptualLoss(levels),
    )
    _copy_generator(generator_dir, out)
    vae.save_pretrained(out / "vae")
    return _add_stage_record(out, "decoder", data_dir, len(images), settings, losses, recorded="mse")


def pretrain_transformer(
    data_dir: str | Path,
    generator_dir: str | Path,
    out: str | Path,
    *,
    size: int,
    max_pairs: int | None = None,
    seed: int = 0,
    steps: int = 100_000,
    max_seconds: float | None = 900,
    batch_size: int = 32,
    lr: float = 5e-4,
    text_dropout: float = 0.15,
    max_text_tokens: int = 48,
    work: str | Path | None = None,
) -> dict:
    """Continue a generator's transformer at a new output `size`; copy the generator to `out` with it.

    The VAE is convolutional, so a generator trained at 128 px can encode and decode 224 px (28 x 28 latents:
    more of a texture survives the decode, bench/RESULTS.md); the transformer has only seen 8 x 8 tokens and
    must learn the larger grid (RoPE positions beyond 8) and the finer scale. Same flow matching as `base` on
    the same corpus, starting from the shipped weights; the VAE and the text encoders are unchanged, and the
    copy's VAE config records `size` as its sample_size (the pipeline's default output side). An attribute
    adapter trained against the old transformer is copied too but should be continued at `size`
    (`adapter --init-adapter ... --size`).
    """
    settings = {key: value for key, value in locals().items() if key not in ("data_dir", "generator_dir", "out")}
    settings.pop("work")
    from generator_plugin.plugins import load_generator

    generator_dir, out, work = Path(generator_dir), Path(out), Path(work) if work is not None else None
    pipeline = load_generator("flux", generator_dir)
    if pipeline.attribute_adapter is not None:
        pipeline.unload_attribute_adapter()  # train and save the base transformer's own attention
    data_key = {"data": str(Path(data_dir).resolve()), "size": size, "max_pairs": max_pairs}
    images, captions = cached(work and work / "images.pt", data_key, lambda: load_examples(data_dir, size, max_pairs))
    print(json.dumps({"examples": len(images), "size": size}), flush=True)
    latent_key = {**data_key, "vae": str(generator_dir.resolve() / "vae")}
    latents = cached(work and work / "latents.pt", latent_key, lambda: encode_latents(pipeline.vae, images, 64))
    sequences, vectors = example_caption_features(pipeline, captions, max_text_tokens)
    transformer = pipeline.transformer.requires_grad_(True)
    ema, losses = train_transformer(
        transformer,
        latents,
        sequences,
        vectors,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        text_dropout=text_dropout,
        seed=seed,
        max_seconds=max_seconds,
        checkpoint_path=work and work / "transformer.ckpt",
    )
    _copy_generator(generator_dir, out)
    ema.save_pretrained(out / "transformer")
    pipeline.vae.register_to_config(sample_size=size)
    pipeline.vae.save_pretrained(out / "vae")
    return _add_stage_record(out, "transformer_at_size", data_dir, len(images), settings, losses)


def _copy_generator(generator_dir: Path, out: Path) -> None:
    """Copy a generator directory to `out` (a stage then overwrites the parts it trained); nothing if the same."""
    if out.resolve() != generator_dir.resolve():
        shutil.copytree(generator_dir, out, dirs_exist_ok=True)


def _add_stage_record(
    out: Path,
    stage: str,
    data_dir: str | Path,
    examples: int,
    settings: dict,
    losses: Sequence[float],
    recorded: str = "loss",
) -> dict:
    """Add a continuing stage's record under `stage` to out's pretrain_config.json (kept: the earlier ones);
    `losses` are the per-step values the stage records, named `recorded`."""
    record_path = out / PRETRAIN_CONFIG_NAME
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record[stage] = {
        "data_dir": str(data_dir),
        "examples": examples,
        "settings": settings,
        "steps": len(losses),
        f"{recorded}_first_last": [_mean_head(losses), _mean_tail(losses)],
    }
    _write_record(out, record)
    return record[stage]


def pretrain_adapter(
    data_dir: str | Path,
    generator_dir: str | Path,
    encoder_dir: str | Path,
    *,
    out: str | Path | None = None,
    size: int | None = None,
    max_pairs: int | None = None,
    seed: int = 0,
    steps: int = 100_000,
    max_seconds: float | None = 600,
    batch_size: int = 64,
    lr: float = 1e-3,
    text_dropout: float = 0.5,
    attribute_dropout: float = 0.1,
    max_text_tokens: int = 48,
    encode_batch_size: int = 32,
    target: str = "pair",
    attributes: Sequence[str] | None = None,
    work: str | Path | None = None,
    pooled_token: bool = True,
    bridge_share: float = 0.5,
    strength_range: tuple[float, float] = (0.5, 0.95),
    weight_gain: float = 1.0,
    init_adapter: str | Path | None = None,
) -> dict:
    """Train an attribute adapter for `encoder_dir`'s tokens; write it to out (default GEN_DIR/attribute_adapter).

    `pooled_token`: condition on the encoder's tokens plus its pooled search vector (AttributeAdapter.condition_tokens);
    False: the tokens alone.

    `size`: the generator's resolution (default: the VAE's recorded sample_size). `attributes` (factor names,
    e.g. lighting palette style): keep only pairs that share one of them and show two different subjects
    (identity differs), the (reference, target) examples of "this content with that reference's attribute";
    the reference is encoded under the shared attributes only. `work`: a folder for the precomputed
    tokens / latents / caption features and the stage's checkpoint, so a rerun resumes.

    `weight_gain`: recorded in the adapter's config; a reference of weight w then steers with w * weight_gain
    (calibrate it on tuning cases, e.g. bench/transfer_score.py --seed 1). Pairs with base images (realpairs
    --bases) also train apply-to-my-image: `bridge_share` of their steps start from the target's base noised to a
    sigma in `strength_range` (train_adapter).

    `init_adapter`: an adapter directory to continue from (its weights, a fresh optimizer and step count) instead
    of a new adapter; it must fit this generator and encoder and read the pooled token as `pooled_token` says.
    """
    from encoder import AttributeEncoder
    from generator_plugin.plugins import load_generator

    settings = {key: value for key, value in locals().items() if key not in ("AttributeEncoder", "load_generator")}
    settings = {key: str(v) if isinstance(v, Path) else v for key, v in settings.items()}
    settings = {key: list(v) if isinstance(v, tuple) else v for key, v in settings.items()}
    root = Path(data_dir)
    work = Path(work) if work is not None else None
    pipeline = load_generator("flux", generator_dir)
    if pipeline.attribute_adapter is not None:
        pipeline.unload_attribute_adapter()
    size = size or pipeline.vae.config.sample_size
    encoder = AttributeEncoder.from_pretrained(encoder_dir).eval()
    records = [r for r in load_pairs(root, verify_images=False).records if r.positive]
    if attributes:
        records = [transfer_example(r, attributes) for r in records]
        records = [r for r in records if r is not None]
    records = records[:max_pairs]
    if not records:
        raise ValueError(f"no pairs in {root} share one of {list(attributes or [])} with a different identity")
    key = {
        "data": str(root.resolve()),
        "generator": str(Path(generator_dir).resolve()),
        "encoder": str(Path(encoder_dir).resolve()),
        **{name: settings[name] for name in ("size", "max_pairs", "target", "attributes", "max_text_tokens")},
        "inputs": "tokens, pooled, bases",
    }
    tokens, pooled, latents, bases, sequences, vectors = cached(
        work and work / "adapter-inputs.pt",
        key,
        lambda: adapter_inputs(pipeline, encoder, root, records, size, target, max_text_tokens, encode_batch_size),
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        adapter = AttributeAdapter.for_transformer(pipeline.transformer, encoder.dimension, pooled_token=pooled_token)
    if init_adapter is not None:
        adapter = continued_adapter(adapter, init_adapter)
    adapter.config = replace(adapter.config, weight_gain=float(weight_gain))  # checked by the config
    pipeline.load_attribute_adapter(adapter)
    losses = train_adapter(
        pipeline,
        adapter.condition_tokens(tokens, pooled),  # what the pipeline gives it: (N, l [+ 1], d_ctx)
        latents,
        sequences,
        vectors,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        text_dropout=text_dropout,
        attribute_dropout=attribute_dropout,
        seed=seed,
        max_seconds=max_seconds,
        checkpoint_path=work and work / "adapter.ckpt",
        base_latents=bases,
        bridge_share=bridge_share,
        strength_range=strength_range,
    )
    adapter_dir = Path(out) if out is not None else Path(generator_dir) / "attribute_adapter"
    adapter.save_pretrained(adapter_dir)
    record = {
        "stage": "adapter",
        "examples": len(tokens),
        "with_base": int((~bases.flatten(1).isnan().any(dim=1)).sum()),
        "encoder_version": encoder.version,  # the tokens it reads: retrain or re-check it when this changes
        "settings": settings,
        "steps": len(losses),
        "loss_first_last": [_mean_head(losses), _mean_tail(losses)],
    }
    (adapter_dir / "adapter_train_record.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def continued_adapter(fresh: AttributeAdapter, directory: str | Path) -> AttributeAdapter:
    """The adapter saved in `directory`, checked to have `fresh`'s shape (same generator, encoder width and
    pooled token: every field of the config but the weight gain); ValueError naming the difference otherwise."""
    loaded = AttributeAdapter.from_pretrained(directory)
    differ = [
        name
        for name in asdict(fresh.config)
        if name != "weight_gain" and getattr(fresh.config, name) != getattr(loaded.config, name)
    ]
    if differ:
        raise ValueError(
            f"--init-adapter {directory} does not fit this generator and encoder: its {', '.join(differ)} differ "
            "(train a new adapter instead, without --init-adapter)"
        )
    return loaded


def transfer_example(record: PairRecord, attributes: Sequence[str]) -> PairRecord | None:
    """The pair as a transfer example: positives cut to the shared `attributes`; None if none or the same subject.

    Needs the pair's recorded factors (realpairs / procedural records have them).
    """
    if not record.positive_factors or not record.factors_x or not record.factors_y:
        return None
    if record.factors_x.get("identity") == record.factors_y.get("identity"):
        return None
    kept = [(p, f) for p, f in zip(record.positive, record.positive_factors, strict=True) if f in attributes]
    if not kept:
        return None
    return replace(record, positive=tuple(p for p, _ in kept), positive_factors=tuple(f for _, f in kept))


@torch.no_grad()
def adapter_inputs(
    pipeline: AttributePipeline,
    encoder,
    root: Path,
    records: Sequence[PairRecord],
    size: int,
    target: str,
    max_text_tokens: int,
    encode_batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The adapter's frozen inputs: reference tokens (N, l, d_ctx) and pooled vectors (N, d_ctx), both half;
    target latents; caption features."""
    # Both directions of every pair: reference x -> target y, and y -> x.
    references = [path for r in records for path in (r.image_x, r.image_y)]
    if target == "pair":
        targets = [path for r in records for path in (r.image_y, r.image_x)]
        captions = [caption for r in records for caption in (r.caption_y, r.caption_x)]
    elif target == "self":  # reconstruct the reference itself: a stronger signal, at the risk of copying it
        targets = list(references)
        captions = [caption for r in records for caption in (r.caption_x, r.caption_y)]
    else:
        raise ValueError(f"target must be 'pair' or 'self', got {target!r}")
    positives = [list(r.positive) for r in records for _ in range(2)]
    started = time.perf_counter()
    token_chunks, pooled_chunks = [], []
    for start in range(0, len(references), encode_batch_size):
        images = [PIL.Image.open(root / p).convert("RGB") for p in references[start : start + encode_batch_size]]
        embeddings = encoder.encode(images, positives[start : start + encode_batch_size])
        token_chunks.append(embeddings.tokens.half())
        pooled_chunks.append(embeddings.pooled.half())
    tokens, pooled = torch.cat(token_chunks), torch.cat(pooled_chunks)  # (N, l, d_ctx), (N, d_ctx)
    latents = encode_latents(pipeline.vae, torch.stack([load_image(root / p, size) for p in targets]))
    # The target's base image (realpairs --bases): the same content without the reference's attribute value.
    if target == "pair":
        base_paths = [(r.meta or {}).get(key) for r in records for key in ("base_y", "base_x")]
    else:
        base_paths = [None] * len(targets)
    bases = torch.full_like(latents, float("nan"))  # NaN rows: no base
    with_base = [i for i, path in enumerate(base_paths) if path]
    if with_base:
        images = torch.stack([load_image(root / base_paths[i], size) for i in with_base])
        bases[with_base] = encode_latents(pipeline.vae, images)
    sequences, vectors = embed_captions(pipeline, captions, max_text_tokens)
    seconds = round(time.perf_counter() - started, 1)
    print(json.dumps({"examples": len(tokens), "with_base": len(with_base), "precompute_seconds": seconds}))
    return tokens, pooled, latents, bases, sequences, vectors


def sample_grid(
    data_dir: str | Path,
    generator_dir: str | Path,
    out: str | Path,
    *,
    count: int = 16,
    size: int | None = None,
    steps: int = 20,
    guidance_scale: float = 1.0,
    seed: int = 0,
    max_text_tokens: int = 48,
) -> Path:
    """Two rows per caption block: corpus images, then samples for their captions; a PNG at `out`."""
    from generator_plugin.plugins import load_generator

    root = Path(data_dir)
    pipeline = load_generator("flux", generator_dir)
    pipeline.set_progress_bar_config(disable=True)
    size = size or pipeline.vae.config.sample_size
    records = load_pairs(root, verify_images=False).records[:count]
    real, fake = [], []
    for index, record in enumerate(records):
        real.append(PIL.Image.open(root / record.image_x).convert("RGB").resize((size, size)))
        fake.append(
            pipeline(
                prompt=record.caption_x,
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                max_sequence_length=max_text_tokens,
                generator=torch.Generator().manual_seed(seed + index),
            ).images[0]
        )
    columns = 8
    rows = [real[i : i + columns] for i in range(0, len(real), columns)]
    rows = [row for i, row in enumerate(rows) for row in (row, fake[i * columns : (i + 1) * columns])]
    grid = PIL.Image.new("RGB", (columns * size, len(rows) * size))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (c * size, r * size))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return Path(out)


def _mean_head(values: Sequence[float], count: int = 50) -> float:
    return float(np.mean(values[:count]))


def _mean_tail(values: Sequence[float], count: int = 50) -> float:
    return float(np.mean(values[-count:]))


def _write_record(directory: Path, record: dict) -> None:
    (directory / PRETRAIN_CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")


def _continuing_stage_parser(commands, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand that continues a trained generator into a copy at --out, with the options they share."""
    parser = commands.add_parser(name, help=help)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--generator", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="a copy of the generator with the trained part")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-pairs", type=int)
    parser.add_argument("--seconds", type=float, default=900)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--work", type=Path, help="cache and checkpoint folder: a rerun resumes from it")
    parser.add_argument("--threads", type=int)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `base`, `decoder`, `transformer`, `adapter` and `samples` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m training.generator_pretrain", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    base = commands.add_parser("base", help="train the VAE and the transformer; write a generator directory")
    base.add_argument("--data", required=True, type=Path)
    base.add_argument("--out", required=True, type=Path)
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--size", type=int, default=64)
    base.add_argument("--max-pairs", type=int)
    base.add_argument("--vae-seconds", type=float, default=240)
    base.add_argument("--vae-steps", type=int, default=100_000)
    base.add_argument("--transformer-seconds", type=float, default=600)
    base.add_argument("--transformer-steps", type=int, default=100_000)
    base.add_argument("--transformer-layers", type=int, nargs=2, default=(3, 3), metavar=("DOUBLE", "SINGLE"))
    base.add_argument("--transformer-heads", type=int, default=4)
    base.add_argument("--transformer-batch-size", type=int, default=32)
    base.add_argument("--vae-batch-size", type=int, default=16)
    base.add_argument("--transformer-lr", type=float, default=1e-3)
    base.add_argument("--vae-channels", type=int, nargs="+", default=(16, 32, 64, 64))
    base.add_argument("--vae-norm-groups", type=int, default=1, help="GroupNorm groups (1: over all channels)")
    base.add_argument("--latent-channels", type=int, default=8)
    base.add_argument("--work", type=Path, help="cache and checkpoint folder: a rerun resumes from it")
    base.add_argument("--threads", type=int)
    decoder = _continuing_stage_parser(
        commands, "decoder", "fine-tune a generator's VAE decoder with a perceptual loss; the latents do not change"
    )
    decoder.set_defaults(seconds=1800, batch_size=8, lr=2e-4)
    decoder.add_argument("--perceptual-weight", type=float, default=1.0)
    decoder.add_argument("--style-weight", type=float, default=0.0)
    decoder.add_argument("--levels", nargs="+", default=("stage2", "stage4"), help="trunk levels the losses read")
    grow = _continuing_stage_parser(commands, "transformer", "continue a generator's transformer at a new output size")
    grow.add_argument("--size", required=True, type=int, help="output side in pixels (a multiple of 16)")
    adapter = commands.add_parser("adapter", help="train the attribute adapter with L_gen, encoder frozen")
    adapter.add_argument("--data", required=True, type=Path)
    adapter.add_argument("--generator", required=True, type=Path)
    adapter.add_argument("--encoder", required=True, type=Path)
    adapter.add_argument("--out", type=Path, help="default: GENERATOR/attribute_adapter")
    adapter.add_argument("--seed", type=int, default=0)
    adapter.add_argument("--max-pairs", type=int)
    adapter.add_argument("--seconds", type=float, default=600)
    adapter.add_argument("--steps", type=int, default=100_000)
    adapter.add_argument("--batch-size", type=int, default=32)
    adapter.add_argument("--lr", type=float, default=1e-3)
    adapter.add_argument("--text-dropout", type=float, default=0.5)
    adapter.add_argument("--target", choices=("pair", "self"), default="pair", help="the other image, or itself")
    adapter.add_argument("--size", type=int, help="default: the generator VAE's sample_size")
    adapter.add_argument("--attributes", nargs="+", help="transfer pairs only: shared factor, different identity")
    adapter.add_argument("--work", type=Path, help="cache and checkpoint folder: a rerun resumes from it")
    adapter.add_argument(
        "--no-pooled-token", dest="pooled_token", action="store_false", help="condition on the tokens alone"
    )
    adapter.add_argument(
        "--bridge-share", type=float, default=0.5, help="share of steps on pairs with a base that start from it"
    )
    adapter.add_argument(
        "--strength-range",
        type=float,
        nargs=2,
        default=(0.5, 0.95),
        metavar=("LOW", "HIGH"),
        help="start sigmas of those steps (img2img strength 0.7 at 20 steps starts near sigma 0.79)",
    )
    adapter.add_argument(
        "--weight-gain",
        type=float,
        default=1.0,
        help="recorded in the adapter: a reference of weight w steers with w x this",
    )
    adapter.add_argument(
        "--init-adapter",
        type=Path,
        help="continue training this adapter directory (e.g. a shipped one) instead of starting a new adapter",
    )
    adapter.add_argument("--threads", type=int)
    samples = commands.add_parser("samples", help="a grid of corpus images and samples for their captions")
    samples.add_argument("--data", required=True, type=Path)
    samples.add_argument("--generator", required=True, type=Path)
    samples.add_argument("--out", required=True, type=Path)
    samples.add_argument("--count", type=int, default=16)
    samples.add_argument("--steps", type=int, default=20)
    samples.add_argument("--guidance-scale", type=float, default=1.0)
    samples.add_argument("--seed", type=int, default=0)
    samples.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "base":
        record = pretrain_base(
            args.data,
            args.out,
            size=args.size,
            max_pairs=args.max_pairs,
            seed=args.seed,
            vae_steps=args.vae_steps,
            vae_seconds=args.vae_seconds,
            transformer_layers=tuple(args.transformer_layers),
            transformer_heads=args.transformer_heads,
            transformer_steps=args.transformer_steps,
            transformer_seconds=args.transformer_seconds,
            transformer_batch_size=args.transformer_batch_size,
            transformer_lr=args.transformer_lr,
            vae_channels=tuple(args.vae_channels),
            vae_norm_groups=args.vae_norm_groups,
            latent_channels=args.latent_channels,
            vae_batch_size=args.vae_batch_size,
            work=args.work,
        )
    elif args.command in ("decoder", "transformer"):
        common = dict(
            max_pairs=args.max_pairs,
            seed=args.seed,
            steps=args.steps,
            max_seconds=args.seconds,
            batch_size=args.batch_size,
            lr=args.lr,
            work=args.work,
        )
        if args.command == "decoder":
            record = pretrain_decoder(
                args.data,
                args.generator,
                args.out,
                perceptual_weight=args.perceptual_weight,
                style_weight=args.style_weight,
                levels=tuple(args.levels),
                **common,
            )
        else:
            record = pretrain_transformer(args.data, args.generator, args.out, size=args.size, **common)
    elif args.command == "adapter":
        record = pretrain_adapter(
            args.data,
            args.generator,
            args.encoder,
            out=args.out,
            max_pairs=args.max_pairs,
            seed=args.seed,
            steps=args.steps,
            max_seconds=args.seconds,
            batch_size=args.batch_size,
            lr=args.lr,
            text_dropout=args.text_dropout,
            target=args.target,
            size=args.size,
            attributes=args.attributes,
            work=args.work,
            pooled_token=args.pooled_token,
            bridge_share=args.bridge_share,
            strength_range=tuple(args.strength_range),
            weight_gain=args.weight_gain,
            init_adapter=args.init_adapter,
        )
    else:
        path = sample_grid(
            args.data,
            args.generator,
            args.out,
            count=args.count,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            seed=args.seed,
        )
        record = {"grid": str(path)}
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
