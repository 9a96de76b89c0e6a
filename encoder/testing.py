"""Small encoders for tests of this and later packages (indexer, generator plugin, training).

Nothing is downloaded: the mllm helpers build random tiny Qwen-VL models from configs with a word-level
tokenizer made here; the compact helper keeps the real pretrained trunk and MiniLM but shrinks the
connector so that a CPU test stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import EncoderConfig
from .model import AttributeEncoder

# Ids 0..6 are fixed because the tiny Qwen-VL configs below name them.
SPECIAL_TOKENS = (
    "[PAD]",
    "[UNK]",
    "[EOS]",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
WORDS = [
    "exclusively",
    "describe",
    ",",
    "and",
    ":",
    "image",
    "lighting",
    "style",
    "art",
    "color",
    "colour",
    "pose",
    "background",
    "identity",
    "man",
    "woman",
    "dog",
    "cat",
    "hairstyle",
    "material",
    "texture",
    "camera",
    "angle",
    "subject",
    "animal",
    "species",
    "environment",
    "expression",
    "shape",
    "light",
    "dark",
    "warm",
    "cold",
    "red",
    "green",
    "blue",
]
QWEN_KINDS = ("qwen2_vl", "qwen2_5_vl")


def word_tokenizer(words: tuple[str, ...] | list[str] = WORDS):
    """A lower-casing word-level tokenizer: SPECIAL_TOKENS at ids 0..6, then `words`; others -> [UNK]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def tiny_qwen_vl_config(kind: str = "qwen2_vl"):
    """A random-weights-sized Qwen2-VL / Qwen2.5-VL config: 2 layers, width 64, head_dim 16."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    ids = dict(image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4)
    common = dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if kind == "qwen2_vl":
        vision = dict(embed_dim=32, hidden_size=64, mlp_ratio=2, **common)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    if kind == "qwen2_5_vl":
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=64,
            window_size=112,
            fullatt_block_indexes=[1],
            **common,
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    raise ValueError(f"unknown tiny Qwen-VL kind {kind!r}; use one of {', '.join(QWEN_KINDS)}")


def save_tiny_qwen_vl(directory: str | Path, kind: str = "qwen2_vl", seed: int = 0) -> Path:
    """Write a random tiny Qwen-VL checkpoint + tokenizer to `directory` (loadable offline by path)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_qwen_vl_config(kind))
    directory = Path(directory)
    model.save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return directory


def tiny_mllm_config(base_model: str | Path, **overrides: Any) -> EncoderConfig:
    """mllm config for the tiny Qwen-VL: 56 px images (4 image tokens), connector 2 x 32, l = 4, d = 32."""
    values: dict[str, Any] = dict(
        context_dim=32,
        num_queries=4,
        connector_depth=2,
        connector_width=32,
        connector_heads=2,
        connector_mlp_ratio=2.0,
        lora_rank=4,
        lora_alpha=8,
        image_size=56,
    )
    values.update(overrides)
    return EncoderConfig.mllm(base_model=str(base_model), **values)


def tiny_mllm_encoder(
    directory: str | Path, kind: str = "qwen2_vl", seed: int = 0, **overrides: Any
) -> AttributeEncoder:
    """A tiny random mllm encoder whose base checkpoint is written to `directory` (config names that path)."""
    base = save_tiny_qwen_vl(directory, kind=kind, seed=seed)
    torch.manual_seed(seed)
    return AttributeEncoder(tiny_mllm_config(base, **overrides))


def tiny_compact_config(**overrides: Any) -> EncoderConfig:
    """Compact config with the real pretrained trunk and MiniLM, a small connector (2 x 64, l = 4, d = 32)."""
    values: dict[str, Any] = dict(
        context_dim=32, num_queries=4, connector_depth=2, connector_width=64, connector_heads=2, lora_rank=4
    )
    values.update(overrides)
    return EncoderConfig.compact(**values)
