"""The mllm backend (the paper's): a Qwen-VL model with LoRA on its language model, then the connector.

Sequence read by the language model, image first so that its prefix can be shared by every attribute:

    <|vision_start|> <|image_pad|> x n <|vision_end|> Exclusively describe {a1}, and {a2}:
    '---------------- prefix (P tokens) -------------' '------ suffix (T tokens) ------'

No chat template is applied: the states are read, never decoded, and LoRA adapts the model to the plain
prompt; fewer suffix tokens also make each extra attribute cheaper. Every image is resized to the same
square (`image_size`), so all prefixes have the same length and the same M-RoPE positions.

`encode` runs prefix + suffix in one pass. `encode_grid` runs the vision tower and the prefix once per
image (keeping its KV cache), repeats the cache K times along the batch, and runs only the B*K suffixes
in one batched pass; causal attention makes the result equal to the full pass. The connector then
reads the last-layer states of the whole sequence (prefix states repeated, suffix states per pair).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForImageTextToText, AutoTokenizer
from transformers.utils import cached_file

from .backbone import EncoderBackbone
from .config import LORA_DIR, EncoderConfig
from .connector import Connector
from .images import ImageInput, to_pixels
from .lora import wrap_with_lora

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Image normalisation of each family's processor, used when the checkpoint has no preprocessor_config.json.
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
DEFAULT_PIXEL_STATS = {
    "qwen2_vl": (_CLIP_MEAN, _CLIP_STD),
    "qwen2_5_vl": (_CLIP_MEAN, _CLIP_STD),
    "qwen3_vl": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def lora_target_pattern(targets: Sequence[str]) -> str:
    """peft regex for the named projections of the language model only (the vision tower stays frozen)."""
    return rf".*language_model.*\.({'|'.join(targets)})"


class MllmBackbone(nn.Module, EncoderBackbone):
    """Qwen-VL (frozen) + LoRA on the language model's attention projections, then the connector."""

    def __init__(
        self,
        config: EncoderConfig,
        *,
        model: nn.Module | None = None,
        tokenizer=None,
        lora_path: str | Path | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        # A model built in memory (benchmarks) has no preprocessor_config.json to read pixel stats from.
        stats_source = config.base_model if model is None else None
        if model is None:
            model = AutoModelForImageTextToText.from_pretrained(
                config.base_model, dtype=dtype or torch.float32, attn_implementation="sdpa", device_map=device
            )
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(config.base_model)
        model_config = model.config
        if model_config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{config.base_model} is a {model_config.model_type!r} model; the mllm backend supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        vision = model_config.vision_config
        self.patch_size = vision.patch_size
        self.temporal_patch_size = vision.temporal_patch_size
        self.merge_size = vision.spatial_merge_size
        step = self.patch_size * self.merge_size
        if config.image_size % step:
            raise ValueError(
                f"image_size {config.image_size} must be a multiple of patch_size x spatial_merge_size = "
                f"{step} for {model_config.model_type}; e.g. {config.image_size // step * step or step}"
            )
        self.image_token_id = model_config.image_token_id
        self.vision_start_id = model_config.vision_start_token_id
        self.vision_end_id = model_config.vision_end_token_id
        self.pixel_mean, self.pixel_std = self._pixel_stats(stats_source, model_config.model_type)
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        # LoRA on the language model; every base weight frozen
        self.backbone = wrap_with_lora(model, config, lora_target_pattern(config.lora_targets), lora_path)
        hidden = model_config.text_config.hidden_size
        self.connector = Connector(
            input_dim=hidden,
            width=config.connector_width,
            depth=config.connector_depth,
            heads=config.connector_heads,
            mlp_ratio=config.connector_mlp_ratio,
            num_queries=config.num_queries,
            context_dim=config.context_dim,
        )
        param = next(model.parameters())
        self.connector.to(param.device, param.dtype)

    @staticmethod
    def _pixel_stats(base_model: str | None, model_type: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean/std from the checkpoint's preprocessor_config.json, else the family's default."""
        if base_model is None:
            return DEFAULT_PIXEL_STATS[model_type]
        path = cached_file(base_model, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        if path is not None:
            values = json.loads(Path(path).read_text())
            if "image_mean" in values and "image_std" in values:
                return tuple(values["image_mean"]), tuple(values["image_std"])
        return DEFAULT_PIXEL_STATS[model_type]

    @property
    def vlm(self) -> nn.Module:
        """The Qwen*VLModel inside peft's wrapper (no LM head: we read states, logits would be waste)."""
        return self.backbone.get_base_model().model

    # ---- inputs -------------------------------------------------------------------------------------

    def patchify(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> pixel_values (B*gh*gw, 3*T*p*p) in Qwen-VL's patch order, image_grid_thw (B, 3)."""
        batch, channels, height, width = pixels.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = height // p, width // p
        frames = pixels[:, None].expand(batch, t, channels, height, width)  # a still image is t equal frames
        patches = frames.reshape(batch, t, channels, gh // m, m, p, gw // m, m, p)
        # -> (B, gh/m, gw/m, m, m, C, t, p, p): merge windows contiguous, as the processor lays them out
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        pixel_values = patches.reshape(batch * gh * gw, channels * t * p * p)
        grid = torch.tensor([[1, gh, gw]], device=pixels.device).expand(batch, 3)
        return pixel_values, grid

    def prefix_inputs(self, images: Sequence[ImageInput]) -> dict[str, torch.Tensor]:
        """Images -> prefix input_ids (B, P), pixel_values, grid, mm_token_type_ids, positions (3, B, P)."""
        param = self.connector.output_proj.weight
        size, mean, std = self.config.image_size, self.pixel_mean, self.pixel_std
        pixels = to_pixels(images, size, mean, std, device=param.device)  # (B, 3, S, S)
        pixel_values, grid = self.patchify(pixels)
        batch = pixels.shape[0]
        num_image_tokens = int(grid[0].prod()) // self.merge_size**2
        ids = [self.vision_start_id] + [self.image_token_id] * num_image_tokens + [self.vision_end_id]
        input_ids = torch.tensor(ids, device=param.device)[None].expand(batch, -1)  # (B, P)
        mm_token_type_ids = (input_ids == self.image_token_id).int()
        # Same grid for every image, so one row of M-RoPE positions (the model's own rule) serves all.
        positions, _ = self.vlm.get_rope_index(
            input_ids[:1], mm_token_type_ids=mm_token_type_ids[:1], image_grid_thw=grid[:1]
        )
        return dict(
            input_ids=input_ids,
            pixel_values=pixel_values.to(param.dtype),
            image_grid_thw=grid,
            mm_token_type_ids=mm_token_type_ids,
            position_ids=positions.expand(3, batch, -1),  # (3, B, P)
        )

    def suffix_inputs(self, phrases: Sequence[str], start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Phrases -> right-padded ids (N, T), mask (N, T), text positions (3, N, T) from `start` on."""
        device = self.connector.output_proj.weight.device
        rows = [
            self.tokenizer(self.config.prompt.format(attributes=phrase), add_special_tokens=False)["input_ids"]
            for phrase in phrases
        ]
        length = max(len(row) for row in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = True
        # Text after the image continues 1-D (all three M-RoPE axes equal) from the image's max position + 1.
        positions = (start + torch.arange(length)).view(1, 1, -1).expand(3, len(rows), -1)
        return ids.to(device), mask.to(device), positions.to(device)

    # ---- forward ------------------------------------------------------------------------------------

    def encode(self, images: Sequence[ImageInput], phrases: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image i under phrase i, one full pass -> tokens (B, l, d_ctx), pooled (B, d_ctx)."""
        prefix = self.prefix_inputs(images)
        batch, prefix_len = prefix["input_ids"].shape
        start = int(prefix["position_ids"].max()) + 1
        suffix_ids, suffix_mask, suffix_positions = self.suffix_inputs(phrases, start)
        mask = torch.cat([suffix_mask.new_ones(batch, prefix_len), suffix_mask], dim=1)  # (B, P + T)
        outputs = self.vlm(
            input_ids=torch.cat([prefix["input_ids"], suffix_ids], dim=1),  # (B, P + T)
            attention_mask=mask.long(),
            position_ids=torch.cat([prefix["position_ids"], suffix_positions], dim=2),  # (3, B, P + T)
            pixel_values=prefix["pixel_values"],
            image_grid_thw=prefix["image_grid_thw"],
            mm_token_type_ids=torch.cat([prefix["mm_token_type_ids"], torch.zeros_like(suffix_ids).int()], dim=1),
            use_cache=False,
        )
        return self.connector(outputs.last_hidden_state, mask)  # (B, l, d_ctx), (B, d_ctx)

    def encode_grid(
        self, images: Sequence[ImageInput], phrases: Sequence[str], image_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image under every phrase, prefix computed once per image -> (B, K, l, d_ctx), (B, K, d).

        `image_tokens` is None here: the prefix (vision tower + KV cache) is shared within this one call.
        """
        prefix = self.prefix_inputs(images)
        batch, prefix_len = prefix["input_ids"].shape
        num_phrases = len(phrases)
        prefix_out = self.vlm(**prefix, use_cache=True)  # vision tower + LM over the prefix, once per image
        prefix_states = prefix_out.last_hidden_state  # (B, P, H)
        cache = prefix_out.cache
        cache.batch_repeat_interleave(num_phrases)  # KV (B, ...) -> (B*K, ...), image-major like the pairs

        start = int(prefix["position_ids"].max()) + 1
        suffix_ids, suffix_mask, suffix_positions = self.suffix_inputs(phrases, start)  # (K, T)
        suffix_ids = suffix_ids.repeat(batch, 1)  # (B*K, T)
        suffix_mask = suffix_mask.repeat(batch, 1)
        mask = torch.cat([suffix_mask.new_ones(batch * num_phrases, prefix_len), suffix_mask], dim=1)  # (B*K, P+T)
        suffix_out = self.vlm(
            input_ids=suffix_ids,
            attention_mask=mask.long(),
            position_ids=suffix_positions.repeat(1, batch, 1),  # (3, B*K, T)
            cache=cache,
            use_cache=True,
        )
        states = torch.cat(
            [prefix_states.repeat_interleave(num_phrases, dim=0), suffix_out.last_hidden_state], dim=1
        )  # (B*K, P + T, H)
        tokens, pooled = self.connector(states, mask)  # (B*K, l, d_ctx), (B*K, d_ctx)
        return (
            tokens.view(batch, num_phrases, *tokens.shape[1:]),  # (B, K, l, d_ctx)
            pooled.view(batch, num_phrases, -1),  # (B, K, d_ctx)
        )

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Parts saved in encoder.safetensors (LoRA goes to lora/ in peft's format)."""
        return {"connector": self.connector}

    @property
    def lora_model(self) -> PeftModel:
        """The peft-wrapped transformer holding the LoRA adapter."""
        return self.backbone

    def save_lora(self, directory: Path) -> None:
        """Write the LoRA adapter to `directory`/lora in peft's format."""
        self.backbone.save_pretrained(str(directory / LORA_DIR))
