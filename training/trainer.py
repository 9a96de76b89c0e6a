"""`train(config) -> checkpoint dir`: the attribute encoder (and the generator's attribute adapter) on pair data.

What trains: the encoder's LoRA, connector and (compact) projector, and the attribute adapter. What stays
frozen: the encoder's base weights (trunk, text model / MLLM) and the whole generator (transformer, VAE, text
encoders). lambda_gen = 0 never loads a generator (encoder-only contrastive training, fine on a CPU);
lambda_con = 0 is the "no L_con" ablation.

A checkpoint directory `output_dir/checkpoint-{step:07d}/` holds

    encoder/               AttributeEncoder.save_pretrained (loadable by the indexer as it is)
    attribute_adapter/     AttributeAdapter.save_pretrained (only when L_gen trains)
    trainer_state.pt       step, optimizer and LR-scheduler state
    train_config.json      the run's TrainConfig

Reproducibility: the data order, the sampled a+/a-, the L_gen reference choice, condition dropout, noise and
timesteps all derive from (seed, micro-step, process), never from the run's history, so a run resumed from a
checkpoint follows the same trajectory as an uninterrupted one (exactly so on the CPU in float32).

Multi-GPU: `accelerate launch -m training.trainer --config CFG` (or torchrun); each process takes its own
slice of every global batch, DDP averages the gradients. The default is one process.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from encoder import AttributeEncoder
from encoder.attributes import attribute_phrases
from encoder.config import EncoderConfig
from training.config import TrainConfig, load_train_config
from training.data.pairs import PairDataset, PairSample, load_pairs, records_with_both
from training.data.procedural import FACTORS
from training.data.realpairs import REAL_FACTORS, factor_label
from training.feature_cache import FeatureCache
from training.losses import (
    contrastive_loss,
    factor_contrastive_loss,
    flow_matching_inputs,
    flow_matching_loss,
    sample_sigmas,
)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_NAME = "trainer_state.pt"
ENCODER_DIR = "encoder"
ADAPTER_DIR = "attribute_adapter"
TRAIN_LOG_NAME = "train_log.jsonl"
TRAINER_STATE_VERSION = 1
# The phrases a factor is read under in the factor loss: procedural factors, then the real-content pairs' own
# (whose "palette" has colour-palette paraphrases); a factor named by neither is read as its own name.
FACTOR_PARAPHRASES: dict[str, tuple[str, ...]] = {
    **{name: factor.paraphrases for name, factor in FACTORS.items()},
    **{name: factor.paraphrases for name, factor in REAL_FACTORS.items()},
}


# ---------------------------------------------------------------------------------------------------------
# The model being trained


def contrastive_embeddings(
    encoder: AttributeEncoder,
    images_x: Sequence[Any],
    images_y: Sequence[Any],
    positive: Sequence[str],
    negative: Sequence[str],
    image_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four single-attribute encodings of P pairs, pooled: E(x,a+), E(x,a-), E(y,a+), E(y,a-), (P, d) each.

    `image_tokens`: the compact backbone's tokens of [*images_x, *images_y], when already computed.
    """
    num_pairs = len(images_x)
    # The backbone does per-image work once per image and per-phrase work once per distinct phrase where it
    # can (compact: the frozen trunk and MiniLM), then reads the 4P (image, phrase) combinations.
    phrases = attribute_phrases([*positive, *negative])
    distinct = list(dict.fromkeys(phrases))
    pos_index = [distinct.index(p) for p in phrases[:num_pairs]]
    neg_index = [distinct.index(p) for p in phrases[num_pairs:]]
    x_index, y_index = list(range(num_pairs)), list(range(num_pairs, 2 * num_pairs))
    _, pooled = encoder.backbone.encode_pairs(
        [*images_x, *images_y],
        distinct,
        x_index + x_index + y_index + y_index,  # (4P,)
        pos_index + neg_index + pos_index + neg_index,  # (4P,)
        image_tokens,
    )
    pos_x, neg_x, pos_y, neg_y = pooled.view(4, num_pairs, -1).unbind(0)
    return pos_x, neg_x, pos_y, neg_y


class AttributeTrainingModule(nn.Module):
    """Encoder + (optional) frozen generator with its trainable adapter; `forward(batch)` returns the losses."""

    def __init__(
        self,
        config: TrainConfig,
        encoder: AttributeEncoder,
        pipeline: Any = None,
        feature_cache: FeatureCache | None = None,
    ) -> None:
        """`feature_cache`: the batches' images are then paths, read from the cache instead of the trunk."""
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.feature_cache = feature_cache
        # The pipeline (VAE, text encoders, scheduler) is a plain attribute, not a submodule: it is frozen and
        # runs without gradients. The transformer and the adapter are registered so DDP / .to() see them.
        self.pipeline = pipeline
        self.transformer = pipeline.transformer if pipeline is not None else None
        self.adapter = pipeline.attribute_adapter if pipeline is not None else None

    def train(self, mode: bool = True) -> AttributeTrainingModule:
        super().train(mode)
        if self.transformer is not None:
            self.transformer.eval()  # frozen: no dropout or other train-mode behaviour in the generator
        return self

    def forward(self, batch: Sequence[PairSample], rng: random.Random) -> dict[str, torch.Tensor]:
        """Weighted total `loss` and its terms `l_con` / `l_gen` (present when their lambda is > 0)."""
        losses: dict[str, torch.Tensor] = {}
        total = None
        images = [s.image_x for s in batch] + [s.image_y for s in batch]  # (2P,): every x, then every y
        image_tokens = None
        if self.config.lambda_con > 0 or self.config.lambda_factor > 0:
            image_tokens = self.image_features(images)  # per-image work once for both losses
        if self.config.lambda_con > 0:
            embeddings = contrastive_embeddings(
                self.encoder,
                images[: len(batch)],
                images[len(batch) :],
                [s.positive_attribute for s in batch],
                [s.negative_attribute for s in batch],
                image_tokens,
            )
            losses["l_con"] = contrastive_loss(*embeddings, tau=self.config.tau)
            total = self.config.lambda_con * losses["l_con"]
        if self.config.lambda_factor > 0:
            losses["l_factor"] = self.factor_loss(batch, rng, image_tokens)
            term = self.config.lambda_factor * losses["l_factor"]
            total = term if total is None else total + term
        if self.config.lambda_gen > 0:
            losses["l_gen"] = self.generative_loss(batch, rng)
            term = self.config.lambda_gen * losses["l_gen"]
            total = term if total is None else total + term
        losses["loss"] = total
        return losses

    def image_features(self, images: Sequence[Any]) -> Any:
        """The backbone's per-image features (None for mllm): from the feature cache when there is one."""
        backbone = self.encoder.backbone
        if self.feature_cache is not None:
            return backbone.project(self.feature_cache.trunk_features(images))  # images are paths here
        return backbone.image_features(images)

    def factor_loss(
        self, batch: Sequence[PairSample], rng: random.Random, image_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Supervised contrastive loss over the 2P images of the batch, per factor their records name.

        Each factor is read under one of its paraphrases drawn per step (open-vocabulary text), the same
        phrase for every image of the batch; images without a value for a factor are left out of its term.
        `image_tokens`: the compact backbone's tokens of every x, then every y, when already computed.
        """
        images = [s.image_x for s in batch] + [s.image_y for s in batch]
        assignments = [s.record.factors_x or {} for s in batch] + [s.record.factors_y or {} for s in batch]
        names = sorted({name for values in assignments for name in values})
        if not names:
            raise ValueError(
                "lambda_factor > 0 needs pairs that record factors_x / factors_y (procedural pairs); "
                "set lambda_factor: 0 for annotated pairs"
            )
        if self.config.factor_sample is not None and len(names) > self.config.factor_sample:
            names = sorted(rng.sample(names, self.config.factor_sample))
        phrases = [rng.choice(FACTOR_PARAPHRASES[name]) if name in FACTOR_PARAPHRASES else name for name in names]
        if image_tokens is not None:
            _, pooled = self.encoder.backbone.encode_grid(images, phrases, image_tokens)  # (2P, F, d)
        else:
            pooled = self.encoder.encode_grid(images, phrases).pooled  # (2P, F, d)
        value_ids: dict[tuple[str, str], int] = {}
        known = [{name: factor_label(name, value) for name, value in values.items()} for values in assignments]
        labels = torch.tensor(
            [
                [
                    value_ids.setdefault((name, values[name]), len(value_ids)) if values.get(name) else -1
                    for name in names
                ]
                for values in known
            ]
        )  # (2P, F): -1 where an image has no (known) value for the factor
        return factor_contrastive_loss(pooled, labels, tau=self.config.tau)

    def generative_loss(self, batch: Sequence[PairSample], rng: random.Random) -> torch.Tensor:
        """L_gen: the target's velocity under its caption, conditioned on E(reference, all its positives)."""
        config, pipeline, transformer = self.config, self.pipeline, self.transformer
        device, dtype = transformer.device, transformer.dtype
        num_pairs = len(batch)
        # One image of each pair is the reference, the other the target (the paper picks at random).
        reference_is_x = [rng.random() < 0.5 for _ in range(num_pairs)]
        references = [s.image_x if ref_x else s.image_y for s, ref_x in zip(batch, reference_is_x, strict=True)]
        targets = [s.image_y if ref_x else s.image_x for s, ref_x in zip(batch, reference_is_x, strict=True)]
        captions = [s.caption_y if ref_x else s.caption_x for s, ref_x in zip(batch, reference_is_x, strict=True)]
        # Condition dropout, the way the pipeline drops conditions at inference: mask 0 = null attribute,
        # zero embeddings = null text. A pair without positives has no attribute to condition on.
        keep_attribute = [bool(s.positive) and rng.random() >= config.attribute_dropout for s in batch]
        keep_text = [rng.random() >= config.text_dropout for _ in batch]

        # Attribute tokens (P, l, d_ctx): one encoding of the reference with the list of all its positives.
        kept = [i for i in range(num_pairs) if keep_attribute[i]]
        tokens = torch.zeros(num_pairs, self.encoder.num_tokens, self.encoder.dimension, device=device)
        if kept:
            encoded = self.encoder.encode([references[i] for i in kept], [list(batch[i].positive) for i in kept])
            tokens = tokens.to(encoded.tokens.dtype).index_copy(
                0, torch.tensor(kept, device=device), encoded.tokens.to(device)
            )
        attribute_mask = torch.tensor(keep_attribute, dtype=torch.float32, device=device)  # (P,)

        with torch.no_grad():
            resolution = config.generator_resolution
            pixels = pipeline.image_processor.preprocess(targets, height=resolution, width=resolution)
            latent_dist = pipeline.vae.encode(pixels.to(device=device, dtype=pipeline.vae.dtype)).latent_dist
            latents = (latent_dist.sample() - pipeline.vae.config.shift_factor) * pipeline.vae.config.scaling_factor
            clean = pack_latents(latents.to(dtype))  # (P, S, 4 C)
            prompt_embeds, pooled_prompt_embeds = self.caption_embeddings(captions, keep_text)
        noise = torch.randn(clean.shape, device=device, dtype=dtype)
        sigmas = sample_sigmas(num_pairs, config.timestep_sampling, device=device)  # (P,)
        noisy, target_velocity = flow_matching_inputs(clean, noise, sigmas)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((num_pairs,), config.train_guidance, device=device)
        predicted = transformer(
            hidden_states=noisy,
            timestep=sigmas.to(dtype),
            guidance=guidance,
            pooled_projections=pooled_prompt_embeds,
            encoder_hidden_states=prompt_embeds,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=pipeline.prepare_latent_image_ids(resolution, resolution),
            joint_attention_kwargs=self.adapter.attention_kwargs(tokens, attribute_mask),
            return_dict=False,
        )[0]  # (P, S, 4 C)
        return flow_matching_loss(predicted, target_velocity)

    def caption_embeddings(self, captions: Sequence[str], keep_text: Sequence[bool]) -> tuple[torch.Tensor, ...]:
        """FLUX's T5 sequence (P, T, joint_dim) and CLIP vector (P, pooled_dim); zeros where the text is dropped."""
        transformer = self.transformer
        embeds, pooled = [], []
        for caption in captions:
            sequence, vector = self.pipeline.encode_prompt(caption, max_sequence_length=self.config.max_text_tokens)
            embeds.append(sequence)
            pooled.append(vector)
        keep = torch.tensor(keep_text, dtype=transformer.dtype, device=transformer.device)  # (P,)
        prompt_embeds = torch.cat(embeds).to(transformer.device, transformer.dtype) * keep.view(-1, 1, 1)
        pooled_prompt_embeds = torch.cat(pooled).to(transformer.device, transformer.dtype) * keep.view(-1, 1)
        return prompt_embeds, pooled_prompt_embeds


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """VAE latents (B, C, h, w) -> FLUX tokens (B, h/2 * w/2, 4 C), the packing of AttributePipeline.prepare_latents."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2)
    patches = patches.permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything that trains, in a fixed order (the optimizer state depends on it)."""
    return [(name, param) for name, param in module.named_parameters() if param.requires_grad]


# ---------------------------------------------------------------------------------------------------------
# Building the parts


def build_encoder(config: TrainConfig, checkpoint: Path | None) -> AttributeEncoder:
    """A fresh encoder from config.encoder (seeded), config.init_encoder, or the checkpoint being resumed."""
    if checkpoint is not None:
        return AttributeEncoder.from_pretrained(checkpoint / ENCODER_DIR)
    if config.init_encoder:
        encoder = AttributeEncoder.from_pretrained(config.init_encoder)
        if config.grow_image_levels:
            encoder.backbone.add_image_levels(config.grow_image_levels)  # refused unless compact
        if config.grow_floor:
            encoder.backbone.add_floor()  # refused unless compact; its initialisation has a fixed seed
        return encoder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return AttributeEncoder(EncoderConfig(**config.encoder))


def build_generator(config: TrainConfig, token_dim: int, device: torch.device, checkpoint: Path | None) -> Any:
    """The frozen generator pipeline with a trainable float32 attribute adapter for `token_dim`-wide tokens."""
    from generator_plugin.adapter import AttributeAdapter
    from generator_plugin.pipeline import AttributePipeline

    if config.generator_dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, config.generator_dtype)
    if config.generator == "tiny":
        from generator_plugin.testing import tiny_generator, tiny_text_encoders

        base = tiny_generator(seed=config.seed, token_dim=None)
        pipeline = AttributePipeline(
            transformer=base.transformer,
            vae=base.vae,
            scheduler=base.scheduler,
            **tiny_text_encoders(seed=config.seed, max_length=config.max_text_tokens),
        ).to(device)
        if dtype != torch.float32:
            pipeline.to(dtype=dtype)
    else:
        from generator_plugin.plugins import load_generator

        pipeline = load_generator(config.generator_plugin, config.generator, device=device, dtype=dtype)
    if pipeline.text_encoder is None:
        raise ValueError(
            f"generator {config.generator} has no text encoders; L_gen embeds each target's caption, so the "
            "directory needs text_encoder/, tokenizer/, text_encoder_2/ and tokenizer_2/"
        )
    for part in (pipeline.transformer, pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2):
        part.requires_grad_(False)
    if config.gradient_checkpointing:
        pipeline.transformer.enable_gradient_checkpointing()

    if checkpoint is not None:
        adapter = AttributeAdapter.from_pretrained(checkpoint / ADAPTER_DIR)
    elif pipeline.attribute_adapter is not None:
        adapter = pipeline.attribute_adapter  # continue training the adapter shipped with the generator
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            adapter = AttributeAdapter.for_transformer(
                pipeline.transformer, token_dim, config.adapter_projection_dim, config.adapter_blocks
            )
    if adapter.config.token_dim != token_dim:
        raise ValueError(
            f"the attribute adapter takes {adapter.config.token_dim}-wide tokens but the encoder makes "
            f"{token_dim}-wide ones; train a fresh adapter (a generator directory without attribute_adapter/)"
        )
    if pipeline.attribute_adapter is not None:
        pipeline.unload_attribute_adapter()
    pipeline.load_attribute_adapter(adapter)  # moves it to the transformer's device and dtype
    adapter.to(dtype=torch.float32).requires_grad_(True)  # trainable weights stay float32 (autocast on GPU)
    return pipeline


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of config.lr at optimizer step `step` (0-based): linear warm-up, then constant or cosine."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


# ---------------------------------------------------------------------------------------------------------
# Data order


class MicroBatches:
    """Which pairs micro-step m of process r reads: a fresh permutation per epoch, from (seed, epoch) only."""

    def __init__(self, num_pairs: int, batch_size: int, num_processes: int, process_index: int, seed: int) -> None:
        self.num_pairs = num_pairs
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.per_epoch = num_pairs // (batch_size * num_processes)  # the incomplete last global batch is dropped
        if self.per_epoch < 1:
            raise ValueError(
                f"{num_pairs} usable pairs are fewer than one global batch ({batch_size} x {num_processes} "
                "processes); lower batch_size or add pairs"
            )
        self._permutation: tuple[int, np.ndarray] | None = None

    def __call__(self, micro_step: int) -> tuple[int, list[int]]:
        """(epoch, pair indices) of micro-step `micro_step`."""
        epoch, position = divmod(micro_step, self.per_epoch)
        if self._permutation is None or self._permutation[0] != epoch:
            self._permutation = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs))
        start = (position * self.num_processes + self.process_index) * self.batch_size
        return epoch, [int(i) for i in self._permutation[1][start : start + self.batch_size]]


class _CachedPairDataset(PairDataset):
    """PairDataset whose images are their absolute paths: the feature cache supplies what the trunk would."""

    def load_image(self, relative: str) -> str:
        return str(self.directory / relative)


class _EpochPairs(torch.utils.data.Dataset):
    """PairDataset items addressed by (epoch, index), so DataLoader workers draw the same a+/a- as the main process."""

    def __init__(self, pairs: PairDataset, plan: Sequence[tuple[int, list[int]]]) -> None:
        self.pairs = pairs
        self.plan = plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, position: int) -> list[PairSample]:
        epoch, indices = self.plan[position]
        self.pairs.set_epoch(epoch)
        return [self.pairs[index] for index in indices]


def _micro_batches(
    pairs: PairDataset, batches: MicroBatches, first: int, last: int, num_workers: int
) -> Iterator[list[PairSample]]:
    plan = [batches(micro_step) for micro_step in range(first, last)]
    loader = torch.utils.data.DataLoader(
        _EpochPairs(pairs, plan), batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_as_is
    )
    yield from loader


def _as_is(batch: list[PairSample]) -> list[PairSample]:
    return batch  # PIL images and strings stay as they are; the encoder takes lists


def _step_seed(seed: int, micro_step: int, process_index: int) -> int:
    return int(np.random.default_rng([seed, micro_step, process_index]).integers(2**62))


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints in output_dir, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / TRAINER_STATE_NAME).is_file()]
    return sorted(found, key=lambda p: p.name)


def _resolve_resume(config: TrainConfig) -> Path | None:
    existing = checkpoint_dirs(config.output_dir)
    if config.resume_from is None:
        if existing:
            raise ValueError(
                f"{config.output_dir} already holds checkpoints ({existing[-1].name}); set resume_from: latest "
                "to continue that run, or pick a new output_dir"
            )
        return None
    if config.resume_from == "latest":
        if not existing:
            raise ValueError(f"resume_from: latest, but {config.output_dir} holds no checkpoint to resume")
        return existing[-1]
    path = Path(config.resume_from)
    if not (path / TRAINER_STATE_NAME).is_file():
        raise ValueError(f"resume_from {path} is not a checkpoint directory: {TRAINER_STATE_NAME} is missing")
    return path


def save_checkpoint(
    directory: Path,
    module: AttributeTrainingModule,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    config: TrainConfig,
) -> None:
    """Write one checkpoint directory atomically (a temporary folder renamed at the end)."""
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    module.encoder.save_pretrained(partial / ENCODER_DIR)
    if module.adapter is not None:
        module.adapter.save_pretrained(partial / ADAPTER_DIR)
    state = {
        "format_version": TRAINER_STATE_VERSION,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    torch.save(state, partial / TRAINER_STATE_NAME)
    config.save(partial)
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)


def _prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    if keep is None:
        return
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------------------
# The loop


def train(
    config: TrainConfig | Mapping[str, Any] | str | Path,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    stop_at_step: int | None = None,
) -> Path:
    """Train per `config` (a TrainConfig, dict, or YAML / JSON path); returns the last checkpoint directory.

    `on_step(step, losses)` is called on the main process after every optimizer step (tests, notebooks).
    `stop_at_step` ends the run early with a checkpoint, as an interruption would (the LR schedule still
    spans `config.steps`); `resume_from: latest` continues it.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs

    config = load_train_config(config)
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda, but CUDA is not available here; use device: cpu or auto")
    use_cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision="no" if use_cpu else config.mixed_precision,
        # Rows whose attribute is dropped leave the encoder unused in L_gen-only steps.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    output_dir = Path(config.output_dir)
    resume = _resolve_resume(config)

    report = load_pairs(config.data_dir, verify_images=False)
    records = records_with_both(report.records) if config.lambda_con > 0 else report.records
    if config.max_pairs is not None:
        records = records[: config.max_pairs]
    dataset_class = _CachedPairDataset if config.feature_cache else PairDataset
    pairs = dataset_class(config.data_dir, records, seed=config.seed)
    batches = MicroBatches(
        len(pairs), config.batch_size, accelerator.num_processes, accelerator.process_index, config.seed
    )

    encoder = build_encoder(config, resume)
    pipeline = None
    if config.lambda_gen > 0:
        pipeline = build_generator(config, encoder.dimension, accelerator.device, resume)
    feature_cache = None
    if config.feature_cache:
        feature_cache = FeatureCache(config.feature_cache, encoder.backbone)
        paths = sorted({str(Path(config.data_dir) / p) for r in records for p in (r.image_x, r.image_y)})
        if accelerator.is_main_process:
            feature_cache.fill(paths, progress=config.progress)
        accelerator.wait_for_everyone()
        feature_cache.reload()  # every process sees the new shard
    module = AttributeTrainingModule(config, encoder, pipeline, feature_cache)
    named = trainable_parameters(module)
    optimizer = torch.optim.AdamW(
        [param for _, param in named],
        lr=config.lr,
        betas=tuple(config.adam_betas),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    prepared, optimizer = accelerator.prepare(module, optimizer)
    start_step = 0
    if resume is not None:
        state = torch.load(resume / TRAINER_STATE_NAME, map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = state["step"]
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        config.save(output_dir)

    prepared.train()
    params = [param for _, param in named]
    progress = None
    if config.progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=config.steps, initial=start_step, desc="train", dynamic_ncols=True)
    end_step = config.steps if stop_at_step is None else min(stop_at_step, config.steps)
    micro_batches = _micro_batches(
        pairs, batches, start_step * config.grad_accum, end_step * config.grad_accum, config.num_workers
    )
    window: dict[str, list[float]] = {}
    started = time.perf_counter()
    last_checkpoint = resume
    for step in range(start_step, end_step):
        totals: dict[str, float] = {}
        for accum in range(config.grad_accum):
            micro_step = step * config.grad_accum + accum
            batch = next(micro_batches)
            seed = _step_seed(config.seed, micro_step, accelerator.process_index)
            torch.manual_seed(seed)  # dropout in the encoder, VAE sampling, noise, timesteps
            last = accum == config.grad_accum - 1
            with nullcontext() if last else accelerator.no_sync(prepared):
                losses = prepared(batch, random.Random(seed))
                accelerator.backward(losses["loss"] / config.grad_accum)
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.item() / config.grad_accum
        if config.max_grad_norm is not None:
            totals["grad_norm"] = float(accelerator.clip_grad_norm_(params, config.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        totals["lr"] = scheduler.get_last_lr()[0]
        out_of_time = False
        if config.max_seconds is not None:  # every process takes part, so all stop at the same step
            late = torch.tensor(float(time.perf_counter() - started > config.max_seconds), device=accelerator.device)
            out_of_time = bool(accelerator.reduce(late, "max"))
        for name, value in totals.items():
            window.setdefault(name, []).append(value)
        if accelerator.is_main_process:
            if on_step is not None:
                on_step(done, totals)
            if progress is not None:
                progress.set_postfix(
                    {k: f"{v:.4g}" for k, v in totals.items() if k in ("loss", "l_con", "l_gen", "l_factor")}
                )
                progress.update()
            if done % config.log_every == 0 or done == end_step or out_of_time:
                line = {"step": done, "seconds": round(time.perf_counter() - started, 2)}
                line.update({name: sum(values) / len(values) for name, values in window.items()})
                with (output_dir / TRAIN_LOG_NAME).open("a") as handle:
                    handle.write(json.dumps(line) + "\n")
                window = {}
        if done % config.checkpoint_every == 0 or done == end_step or out_of_time:
            last_checkpoint = output_dir / f"{CHECKPOINT_PREFIX}{done:07d}"
            if accelerator.is_main_process:
                unwrapped = accelerator.unwrap_model(prepared)
                save_checkpoint(last_checkpoint, unwrapped, optimizer, scheduler, done, config)
                _prune_checkpoints(output_dir, config.keep_checkpoints)
            accelerator.wait_for_everyone()
        if out_of_time:
            break
    if progress is not None:
        progress.close()
    if last_checkpoint is None:
        raise ValueError(f"nothing to do: the run resumed at step {start_step} and steps is {config.steps}")
    return last_checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m training.trainer --config CFG [--resume]` (also under `accelerate launch -m training.trainer`)."""
    parser = argparse.ArgumentParser(prog="python -m training.trainer", description="Train the attribute encoder.")
    parser.add_argument("--config", required=True, type=Path, help="training config (.yaml / .json)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a config value")
    parser.add_argument(
        "--stop-at-step", type=int, help="end early with a checkpoint at this step (the LR schedule still spans steps)"
    )
    args = parser.parse_args(argv)
    values = load_train_config(args.config).to_dict()
    for item in args.set:
        key, _, raw = item.partition("=")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    if args.resume:
        values["resume_from"] = "latest"
    config = TrainConfig.from_dict(values, source=f"{args.config} with --set overrides")
    checkpoint = train(config, stop_at_step=args.stop_at_step)
    print(json.dumps({"checkpoint": str(checkpoint)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
