"""The attribute encoder: image + attribute text -> tokens for the generator and a pooled vector for search."""

from .config import EncoderConfig
from .model import AttributeEmbeddings, AttributeEncoder

__all__ = ["AttributeEmbeddings", "AttributeEncoder", "EncoderConfig"]
