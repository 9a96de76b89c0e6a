"""The LoRA wrap both backends put on their language model: a new adapter, or a saved one to train further."""

from __future__ import annotations

import warnings
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from .config import EncoderConfig


def wrap_with_lora(
    model: nn.Module, config: EncoderConfig, target_modules: list[str] | str, lora_path: str | Path | None
) -> PeftModel:
    """`model` with its base weights frozen and LoRA on `target_modules` (fresh, or loaded from `lora_path`)."""
    # peft reads transformers' deprecated `is_gradient_checkpointing` while wrapping a model: silence just that
    # FutureWarning (peft's to fix), so encoder commands print nothing alarming.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        if lora_path is not None:
            return PeftModel.from_pretrained(model, str(lora_path), is_trainable=True)
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules=target_modules,
            bias="none",
        )
        return get_peft_model(model, lora)
