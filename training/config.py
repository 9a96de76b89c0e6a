"""`TrainConfig`: every setting of a training run, read from YAML / JSON or built in code, saved with each checkpoint.

Unknown keys are an error at start, with the key named, so a typo ("lamda_con") never silently trains with a
default. Nothing here reads the environment: paths and devices are explicit values.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAIN_CONFIG_NAME = "train_config.json"
LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISIONS = ("bf16", "no")
TIMESTEP_SAMPLINGS = ("logit_normal", "uniform")


@dataclass
class TrainConfig:
    """One training run: data, encoder, optional generator, losses, optimiser, checkpoints."""

    data_dir: str  # a pair dataset directory (training/data/pairs.py format)
    output_dir: str  # checkpoint-XXXXXXX/ folders are written here
    # Encoder: EncoderConfig values for a fresh encoder, or init_encoder = a saved encoder to start from.
    encoder: dict[str, Any] = field(default_factory=lambda: {"backend": "compact"})
    init_encoder: str | None = None
    # Trunk levels to add to init_encoder's image tokens (encoder image_levels names), through a zero-initialised
    # projection: training starts from exactly init_encoder's function. Compact encoders only.
    grow_image_levels: list[str] = field(default_factory=list)
    # Add the floor (encoder/floor.py) to init_encoder, at its initialisation; compact encoders only.
    grow_floor: bool = False
    # A directory of cached frozen-trunk features (training/feature_cache.py): filled at start with the images
    # it lacks, then training reads the trunk's output from it instead of running the trunk. Compact encoders
    # and encoder-only training (lambda_gen = 0) only. None: the trunk runs every step.
    feature_cache: str | None = None
    # Generator for L_gen: a diffusers FLUX-layout directory (loaded by the `generator_plugin` plugin), or
    # "tiny" for the tiny random generator built in code (tests, smoke runs). Unused when lambda_gen = 0.
    generator: str | None = None
    generator_plugin: str = "flux"
    generator_resolution: int = 512  # side of the target image fed to the VAE
    generator_dtype: str = "auto"  # frozen generator weights: "auto" = bfloat16 on CUDA, float32 on CPU
    adapter_projection_dim: int | None = None  # None: the transformer's hidden size
    adapter_blocks: list[int] | None = None  # None: every double-stream block
    gradient_checkpointing: bool = False  # of the frozen transformer (saves activation memory at 512+ px)
    max_text_tokens: int = 512  # T5 sequence length of the captions (FLUX.1-dev: 512)
    train_guidance: float = 1.0  # FLUX guidance-embedding value during training (guidance-distilled models)
    timestep_sampling: str = "logit_normal"
    text_dropout: float = 0.1  # P(caption -> zero embeddings), the null text of the pipeline
    attribute_dropout: float = 0.1  # P(attribute mask 0), the null attribute of the pipeline
    # Losses
    lambda_gen: float = 1.0
    lambda_con: float = 0.01
    tau: float = 0.1
    # Not in the paper: supervised contrastive loss over the factor values that procedural pairs record
    # (training.losses.factor_contrastive_loss); 0 trains with the paper's two losses only.
    lambda_factor: float = 0.0
    # Factors read per step by the factor loss: None reads every factor the batch's records name (procedural
    # pairs: 9, so the factor loss runs the connector 9 times per image, most of a CPU step); k draws k of them
    # per step (from the step's seeded rng, so a resumed run draws the same ones).
    factor_sample: int | None = None
    # Optimisation
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # pairs per micro-batch per process
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # after warm-up
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "bf16"  # bf16 autocast on CUDA; always full precision on CPU
    device: str = "auto"  # "auto", "cpu" or "cuda"
    num_threads: int | None = None  # torch CPU threads; None leaves torch's default
    seed: int = 0
    max_pairs: int | None = None  # use only the first max_pairs valid pairs
    num_workers: int = 0  # DataLoader workers (image decoding)
    max_seconds: float | None = None  # stop (with a checkpoint) after this much training time; None: no limit
    # Checkpoints and logging
    checkpoint_every: int = 500
    keep_checkpoints: int | None = 2  # the newest N are kept; None keeps all
    resume_from: str | None = None  # None, "latest" (newest in output_dir) or a checkpoint directory
    log_every: int = 10  # steps between lines of train_log.jsonl
    progress: bool = True

    def __post_init__(self) -> None:
        if self.lambda_gen < 0 or self.lambda_con < 0 or self.lambda_factor < 0:
            raise ValueError("lambda_gen, lambda_con and lambda_factor must be >= 0")
        if self.lambda_gen == 0 and self.lambda_con == 0 and self.lambda_factor == 0:
            raise ValueError(
                "lambda_gen, lambda_con and lambda_factor are all 0: there is nothing to train; set one above 0"
            )
        if self.lambda_gen > 0 and not self.generator:
            raise ValueError(
                "lambda_gen > 0 needs a generator: a diffusers FLUX directory or 'tiny'; "
                "or set lambda_gen: 0 for encoder-only contrastive training"
            )
        if self.tau <= 0:
            raise ValueError(f"tau must be positive, got {self.tau}")
        if self.grow_image_levels and not self.init_encoder:
            raise ValueError(
                "grow_image_levels adds levels to init_encoder: set init_encoder, or put the levels in "
                "encoder.image_levels for a fresh encoder"
            )
        if self.factor_sample is not None and self.factor_sample < 1:
            raise ValueError(f"factor_sample must be a positive integer or null, got {self.factor_sample}")
        if self.grow_floor and not self.init_encoder:
            raise ValueError("grow_floor adds the floor to init_encoder: set init_encoder, or encoder.floor: true")
        if self.feature_cache and self.lambda_gen > 0:
            raise ValueError(
                "feature_cache replaces the images by cached trunk features, but L_gen needs the images; "
                "set lambda_gen: 0 or drop feature_cache"
            )
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "checkpoint_every",
            "log_every",
            "generator_resolution",
            "max_text_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("text_dropout", "attribute_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        choices = {
            "lr_schedule": LR_SCHEDULES,
            "mixed_precision": MIXED_PRECISIONS,
            "timestep_sampling": TIMESTEP_SAMPLINGS,
            "device": ("auto", "cpu", "cuda"),
            "generator_dtype": ("auto", "float32", "bfloat16"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} is {getattr(self, name)!r}; use one of {', '.join(allowed)}")
        if len(self.adam_betas) != 2:
            raise ValueError(f"adam_betas needs two values, got {self.adam_betas}")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError("keep_checkpoints must be at least 1 (or null to keep all)")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "training config") -> TrainConfig:
        """Build from plain values; ValueError naming every unknown key (and the missing required ones)."""
        if not isinstance(values, Mapping):
            raise ValueError(f"{source} must be a mapping of setting -> value, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown key(s) {', '.join(repr(key) for key in unknown)}; "
                f"known keys: {', '.join(sorted(known))}"
            )
        missing = [name for name in ("data_dir", "output_dir") if name not in values]
        if missing:
            raise ValueError(f"{source}: missing required key(s) {', '.join(missing)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, directory: str | Path) -> None:
        """Write train_config.json into `directory` (every checkpoint carries the config it was trained with)."""
        (Path(directory) / TRAIN_CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def load_train_config(config: TrainConfig | Mapping[str, Any] | str | Path) -> TrainConfig:
    """A TrainConfig from itself, a dict, or a .yaml / .yml / .json file (a checkpoint's train_config.json too)."""
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, Mapping):
        return TrainConfig.from_dict(config)
    path = Path(config)
    if path.is_dir():
        path = path / TRAIN_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text)
    elif path.suffix == ".json":
        values = json.loads(text)
    else:
        raise ValueError(f"training config {path}: use a .yaml, .yml or .json file")
    return TrainConfig.from_dict(values or {}, source=str(path))
