"""The attribute encoder: image + attribute text -> tokens for the generator and a pooled vector for search."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import EncoderConfig
    from .model import AttributeEmbeddings, AttributeEncoder

__all__ = ["AttributeEmbeddings", "AttributeEncoder", "EncoderConfig"]


def __getattr__(name: str) -> object:
    # Lazy (PEP 562): `encoder.runtime` and `encoder.config` import without torch, peft and transformers
    # (seconds), so a process that never encodes, like a CLI search by stored id, does not pay for them.
    if name == "EncoderConfig":
        from .config import EncoderConfig

        return EncoderConfig
    if name in ("AttributeEmbeddings", "AttributeEncoder"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'encoder' has no attribute {name!r}")
