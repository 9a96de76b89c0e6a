"""`EncoderBackbone`: the one interface `AttributeEncoder` and training call on a backend (compact, mllm).

Both backends subclass it explicitly, so a feature one backend lacks has a default here instead of being
probed for with `hasattr`: per-image work that can be kept between calls (`image_tokens`; the compact
trunk's tokens, nothing for mllm, whose prefix cache lives inside one call), any (image, phrase) pairs in
one call (`encode_pairs`), and growing trunk levels and the floor (`add_image_levels`, `add_floor`,
compact only).

Phrases reaching a backbone are already normalised (`encoder.attributes.attribute_phrases`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from .config import EncoderConfig
from .images import ImageInput

if TYPE_CHECKING:
    from peft import PeftModel


class EncoderBackbone(Protocol):
    """What a backend provides: encoding of (image, phrase) pairs, its trainable parts and its LoRA."""

    config: EncoderConfig

    def encode(self, images: Sequence[ImageInput], phrases: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image i under phrase i -> tokens (B, l, d_ctx), pooled (B, d_ctx)."""
        ...

    def encode_grid(
        self, images: Sequence[ImageInput], phrases: Sequence[str], image_tokens: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image under every phrase -> tokens (B, K, l, d_ctx), pooled (B, K, d_ctx).

        `image_tokens`: `self.image_tokens(images)` when computed earlier (None: computed here if any).
        """
        ...

    def image_tokens(self, images: Sequence[ImageInput]) -> torch.Tensor | None:
        """Per-image work that later calls can reuse (B, cells, d), or None where a backend keeps none."""
        return None

    def image_features(self, images: Sequence[ImageInput]) -> Any:
        """Per-image work including the floor's descriptors (compact: `ImageFeatures`), or None where none is kept.

        Pass it wherever `image_tokens` is accepted; an encoder with the floor needs this, not `image_tokens`.
        """
        return None

    def encode_pairs(
        self,
        images: Sequence[ImageInput],
        phrases: Sequence[str],
        image_index: Sequence[int],
        phrase_index: Sequence[int],
        image_tokens: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs (images[image_index[p]], phrases[phrase_index[p]]) -> tokens (P, l, d_ctx), pooled (P, d_ctx).

        The default encodes the P pairs as they are; a backend that shares per-image and per-phrase work
        overrides it (`image_tokens`, when given, are `self.image_tokens(images)`).
        """
        return self.encode([images[i] for i in image_index], [phrases[j] for j in phrase_index])

    def add_image_levels(self, levels: Sequence[str]) -> None:
        """Read these trunk levels too (compact only); other backends have no trunk levels to grow."""
        raise ValueError(
            f"image levels {list(levels)} can only be added to a compact encoder, not a {self.config.backend!r} one; "
            "start from a compact init_encoder or drop grow_image_levels"
        )

    def add_floor(self, gate_connector: bool = False) -> None:
        """Add the floor (compact only, encoder/floor.py); other backends have no trunk descriptors."""
        raise ValueError(
            f"the floor can only be added to a compact encoder, not a {self.config.backend!r} one; "
            "start from a compact init_encoder or drop grow_floor"
        )

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Parts saved in encoder.safetensors, by prefix (LoRA goes to lora/ in peft's format)."""
        ...

    @property
    def lora_model(self) -> PeftModel:
        """The peft-wrapped transformer holding the LoRA adapter."""
        ...

    def save_lora(self, directory: Path) -> None:
        """Write the LoRA adapter to `directory`/lora in peft's format."""
        ...
